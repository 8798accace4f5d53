r"""Prepares a TFDS data set from local files in one of the documented formats.

    python -m launch.build_data --kind=captions --path=/data/cc/train.jsonl --data_dir=/data/tfds
    python -m launch.build_data --kind=conversations --path=train=/d/llava.json,validation=/d/val.json \
        --image_root=/d/images --data_dir=/data/tfds

Prints the data set name to put in a config's `data.sources` (with `data.data_dir`),
the number of records per split, and the records skipped by reason (with the file and
line of the first few). Kinds: captions (COCO JSON or JSONL), interleaved (MMC4 JSONL),
conversations (LLaVA JSON), text (JSONL). See README "On-disk formats".

A data set prepared before from the same annotation files is reused (it says so) unless
an image it read changed since: then it is rebuilt. Delete its folder to force a rebuild.

Image paths in the annotation files may be absolute or leave the image root ("../");
with --data_root_only such records are skipped and counted (outside_data_root), their
files never opened: use it for annotation files you did not write.
"""

import argparse
import logging
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
  parser.add_argument("--data_root_only", action="store_true",
                      help="skip (count as outside_data_root) records whose image paths are absolute or "
                      "leave the image root, e.g. '../x.jpg': for third-party annotation files")
  args = parser.parse_args(argv)
  logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("vlm_jax").setLevel(logging.INFO)  # says whether it built or reused the data set
  from vlm_jax.data import builders
  builder = builders.build_from_files(args.kind, parse_path(args.path), args.data_dir, args.image_root,
                                      data_root_only=args.data_root_only)
  name = f"{builder.name}/{builder.builder_config.name}"
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"data set: {name}\nin:       {args.data_dir}\nrecords:  {splits}\n"
        f"skipped:  {builders.skipped_counts(builder) or 'none'}")
  for reason, examples in builders.skipped_examples(builder).items():
    for example in examples:
      print(f"  {reason}: {example}")
  return name


if __name__ == "__main__":
  main()
