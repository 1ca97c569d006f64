"""``smsdl sample -o DIR``: write the built-in sample (H&E, processed imzML, ground truth)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="write the built-in sample data set as files")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..sample import write_sample

    info = write_sample(args.output)
    print(f"wrote the sample to {args.output}: he.png, msi.imzML/.ibd {info['msi_shape']}, "
          f"ground_truth.npy {info['ground_truth_shape']}, sample.json")
    return 0
