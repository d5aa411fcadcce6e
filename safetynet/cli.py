"""The `safetynet` command: parses arguments and calls the pipeline's stages (no logic of its own)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_USAGE = 2
FAMILIES = ("input", "activations", "safetynet", "mahalanobis", "squeeze", "ensemble")  # detector.FAMILIES
DEFAULT_MEMBERS = ("input", "safetynet", "squeeze")  # training.detector.DEFAULT_MEMBERS


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default="digits",
        help="digits (bundled, default), mnist, fashion_mnist, cifar10 (downloaded by Keras), "
        "or a path: .npz with x_train/y_train/x_test/y_test, a folder of CIFAR pickle batches, "
        "or an image folder with one sub-folder per class",
    )


def _part(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    try:
        part = (int(index), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not slash or part[1] < 1 or not 0 <= part[0] < part[1]:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return part


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safetynet", description="Detect adversarial examples in front of Keras classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="classifier -> FGSM/PGD datasets -> detector -> report, in one go")
    _add_data(quick)
    quick.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    quick.add_argument("--eps", type=float, help="attack budget (default 0.3 for grayscale, 8/255 for colour)")
    quick.add_argument("--n-attack", type=int, default=10_000, help="training images to attack (default 10000)")
    quick.add_argument("--n-eval", type=int, help="test images to evaluate on (default all)")
    quick.add_argument("--classifier-epochs", type=int, default=10)
    quick.add_argument("--detector-epochs", type=int, default=10)
    quick.add_argument("--target-fpr", type=float, default=0.05, help="clean false-positive rate to calibrate to")
    quick.add_argument("--family", default="input", choices=FAMILIES, help="detector family (default input)")
    quick.add_argument("--seed", type=int, default=0)

    train = commands.add_parser("train-classifier", help="train the reference CNN and save it as .keras")
    _add_data(train)
    train.add_argument("--out", required=True, help="output .keras file")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)

    attack = commands.add_parser("attack", help="write an adversarial dataset for a saved classifier")
    attack.add_argument("--model", required=True, help=".keras or .h5 classifier")
    _add_data(attack)
    attack.add_argument("--attack", required=True, help="attack name or spec name[:key=value,...], e.g. pgd:eps=0.3,steps=10")
    attack.add_argument("--eps", type=float, help="perturbation budget (default 0.3 for grayscale, 8/255 for colour)")
    attack.add_argument("--steps", type=int, help="iterations (iterative attacks)")
    attack.add_argument("--step-size", type=float, help="per-step move (default 2.5 * eps / steps)")
    attack.add_argument("--norm", choices=("inf", "2"), help="perturbation norm (default inf)")
    attack.add_argument("--targets", choices=("random", "least_likely"), help="targeted attack: target classes")
    attack.add_argument("--surrogate", help="craft on this model instead and measure transfer to --model")
    attack.add_argument("--split", choices=("train", "test"), default="train")
    attack.add_argument("--n", type=int, help="number of images to attack (default all of the split)")
    attack.add_argument("--batch-size", type=int, default=256)
    attack.add_argument("--shard-size", type=int, default=10_000, help="examples per shard file (default 10000)")
    attack.add_argument("--shard", type=_part, default=(0, 1), metavar="I/N",
                        help="attack only the I-th of N contiguous parts (0-based), for N hosts; join with `dataset merge`")
    attack.add_argument("--out", required=True, help="output dataset directory (rerun the same command to resume)")

    dataset = commands.add_parser("dataset", help="inspect, verify and merge adversarial datasets")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    info = dataset_commands.add_parser("info", help="print a dataset's summary")
    info.add_argument("directory")
    verify = dataset_commands.add_parser("verify", help="check every shard against the manifest (exit 1 on problems)")
    verify.add_argument("directory")
    merge = dataset_commands.add_parser("merge", help="join the parts of a --shard I/N run into one dataset")
    merge.add_argument("parts", nargs="+", help="the part directories")
    merge.add_argument("--out", required=True)

    detect = commands.add_parser("train-detector", help="fit and calibrate a detector on adversarial datasets")
    detect.add_argument("--adversarial", nargs="+", required=True, help="dataset directories written by `attack`")
    detect.add_argument("--out", required=True, help="output detector directory")
    detect.add_argument("--family", default="input", choices=FAMILIES,
                        help="detector family (default input; all others read the classifier: give --model)")
    detect.add_argument("--model", help="the classifier the datasets were made for (needed by all families but input)")
    detect.add_argument("--members", nargs="+", default=DEFAULT_MEMBERS, choices=[f for f in FAMILIES if f != "ensemble"],
                        help="ensemble members (default: %(default)s)")
    detect.add_argument("--target-fpr", type=float, default=0.05)
    detect.add_argument("--epochs", type=int, default=10)
    detect.add_argument("--seed", type=int, default=0)

    retrain = commands.add_parser("retrain", help="fine-tune a detector on a new attack, replaying earlier data")
    retrain.add_argument("--detector", required=True, help="the detector directory to start from (left unchanged)")
    retrain.add_argument("--adversarial", nargs="+", required=True, help="dataset directories of the new attack(s)")
    retrain.add_argument("--replay", nargs="*", help="earlier datasets to replay (default: those the detector was trained on)")
    retrain.add_argument("--out", help="new detector directory (default: DETECTOR.vN)")
    retrain.add_argument("--epochs", type=int, default=5)
    retrain.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser("evaluate", help="detection rates per attack on the test split -> report.json")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--detector", required=True)
    _add_data(evaluate)
    evaluate.add_argument("--attacks", nargs="*", help="attack specs (default: those the detector was trained on)")
    evaluate.add_argument("--n", type=int, help="test images to use (default all)")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--out", required=True, help="output folder for report.json")
    return parser


def _run(args: argparse.Namespace) -> int:
    from training import workflow

    if args.command == "quickstart":
        workflow.quickstart(
            args.data, args.out, eps=args.eps, n_attack=args.n_attack, n_eval=args.n_eval,
            classifier_epochs=args.classifier_epochs, detector_epochs=args.detector_epochs,
            target_fpr=args.target_fpr, family=args.family, seed=args.seed,
        )
    elif args.command == "train-classifier":
        workflow.train_classifier_stage(args.data, args.out, epochs=args.epochs, seed=args.seed)
    elif args.command == "attack":
        workflow.attack_stage(
            args.model, args.data, args.attack, args.out, split=args.split, n=args.n, batch_size=args.batch_size,
            targets=args.targets, surrogate=args.surrogate, part=args.shard, shard_size=args.shard_size,
            params={"eps": args.eps, "steps": args.steps, "step_size": args.step_size, "norm": args.norm},
        )
    elif args.command == "dataset" and args.dataset_command == "info":
        workflow.dataset_info(args.directory)
    elif args.command == "dataset" and args.dataset_command == "verify":
        return 0 if workflow.dataset_verify(args.directory) else 1
    elif args.command == "dataset" and args.dataset_command == "merge":
        workflow.dataset_merge(args.parts, args.out)
    elif args.command == "train-detector":
        workflow.train_detector_stage(
            args.adversarial, args.out, family=args.family, model_path=args.model, members=args.members,
            target_fpr=args.target_fpr, epochs=args.epochs, seed=args.seed,
        )
    elif args.command == "retrain":
        workflow.retrain_stage(args.detector, args.adversarial, replay=args.replay, out=args.out, epochs=args.epochs, seed=args.seed)
    elif args.command == "evaluate":
        workflow.evaluate_stage(
            args.model, args.detector, args.data, args.out,
            attacks=args.attacks, n=args.n, batch_size=args.batch_size,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors in the user's input print one line and exit 2 (SAFETYNET_DEBUG=1 shows the traceback)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("SAFETYNET_DEBUG"):
            raise
        print(f"safetynet {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
