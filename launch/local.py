r"""Runs N processes of `launch.main` on this machine, as a pod would (for testing multi-host code).

    python -m launch.local --processes=2 --devices_per_process=2 -- \
        --config=configs/tiny_train.py --workdir=/tmp/run

Each process gets `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=i`
and its own virtual CPU devices. The launcher waits for all and returns the
first non-zero exit code.
"""

import argparse
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(processes: int, devices_per_process: int, main_args: list[str], module: str = "launch.main") -> int:
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", module, *main_args, f"--coordinator=127.0.0.1:{port}",
                             f"--num_processes={processes}", f"--process_id={i}",
                             f"--cpu_devices={devices_per_process}"]) for i in range(processes)]
  codes = [p.wait() for p in procs]
  return next((c for c in codes if c), 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2, help="number of processes to start")
  parser.add_argument("--devices_per_process", type=int, default=1, help="virtual CPU devices per process")
  parser.add_argument("main_args", nargs=argparse.REMAINDER, help="arguments for launch.main (after --)")
  args = parser.parse_args()
  main_args = [a for a in args.main_args if a != "--"]
  sys.exit(launch(args.processes, args.devices_per_process, main_args))


if __name__ == "__main__":
  main()
