r"""Prepares a TFDS data set from local files in one of the documented formats.

    python -m launch.build_data --kind=captions --path=/data/cc/train.jsonl --data_dir=/data/tfds
    python -m launch.build_data --kind=conversations --path=train=/d/llava.json,validation=/d/val.json \
        --image_root=/d/images --data_dir=/data/tfds

Prints the data set name to put in a config's `data.sources` (with `data.data_dir`),
the number of records per split, and the records skipped by reason.
Kinds: captions (COCO JSON or JSONL), interleaved (MMC4 JSONL), conversations
(LLaVA JSON), text (JSONL). See README "On-disk formats".
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_path(path: str):
  """`file` -> file (split "train"); `split=file,split=file` -> {split: file}."""
  if "=" not in path:
    return path
  return dict(item.split("=", 1) for item in path.split(","))


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kind", required=True, choices=["captions", "interleaved", "conversations", "text"],
                      help="the on-disk format of --path")
  parser.add_argument("--path", required=True, help="annotation file, or split=file,split=file")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to prepare into")
  parser.add_argument("--image_root", default=None, help="folder image paths are relative to "
                      "(default: the annotation file's folder)")
  args = parser.parse_args(argv)
  from vlm_jax.data import builders
  builder = builders.build_from_files(args.kind, parse_path(args.path), args.data_dir, args.image_root)
  name = f"{builder.name}/{builder.builder_config.name}"
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"data set: {name}\nin:       {args.data_dir}\nrecords:  {splits}\n"
        f"skipped:  {builders.skipped_counts(builder) or 'none'}")
  return name


if __name__ == "__main__":
  main()
