"""The `safetynet` command: parses arguments and calls the pipeline's stages (no logic of its own).

Nothing heavy is imported until the arguments parse: attack names, data specs and choices are checked
first, so a typo costs a fraction of a second and prints one line, with no TensorFlow start-up noise.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from safetynet import __version__

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_USAGE = 2
ATTACK_NAMES = ("fgsm", "bim", "pgd", "mifgsm", "apgd", "cw", "deepfool", "jsma")  # attacks.ATTACKS
TRAINING_ATTACK_NAMES = (*ATTACK_NAMES, "fgsm_rs")  # training.adversarial.training_attack
DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10")  # training.data.BUILTIN_DATASETS
ADAPTIVE_SUITE = ("adaptive_pgd", "apgd_ce", "apgd_dlr", "apgd_dlr_targeted", "orthogonal_pgd", "selective_pgd")  # detector.adaptive_evaluation.SUITE
ADAPTIVE_STEPS = 60  # AdaptiveSettings.steps
FAMILIES = ("input", "activations", "safetynet", "mahalanobis", "squeeze", "ensemble", "joint")  # detector.FAMILIES
DEFAULT_MEMBERS = ("input", "safetynet", "squeeze")  # training.detector.DEFAULT_MEMBERS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `safetynet attack: error: ...`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _spec_checker(names: Sequence[str]):
    """An argparse type for `name[:key=value,...]` that knows the names (parameters are checked later)."""

    def check(text: str) -> str:
        name = text.partition(":")[0].strip().lower().replace("-", "_")
        if name not in names:
            raise argparse.ArgumentTypeError(f"unknown attack {name!r}: expected one of {', '.join(names)}")
        return text

    return check


_attack_spec = _spec_checker(ATTACK_NAMES)
_training_attack_spec = _spec_checker(TRAINING_ATTACK_NAMES)


def _data_spec(text: str) -> str:
    """A built-in dataset name, or a path that exists."""
    if text in DATASET_NAMES or Path(text).expanduser().exists():
        return text
    if text.endswith(".npz") or Path(text).name != text:
        raise argparse.ArgumentTypeError(f"dataset path not found: {text}")
    raise argparse.ArgumentTypeError(f"unknown dataset {text!r}: valid names are {', '.join(DATASET_NAMES)}, "
                                     "and no file or folder of that name was found")


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default="digits", type=_data_spec,
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


def _fraction(text: str) -> float:
    """A number or a fraction such as 8/255."""
    numerator, slash, denominator = text.partition("/")
    try:
        return float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


def _id_range(text: str) -> list[int]:
    """A record id (7) or an inclusive range of them (10-20)."""
    first, dash, last = text.partition("-")
    if not (first.isdigit() and (not dash or last.isdigit())) or (dash and int(last) < int(first)):
        raise argparse.ArgumentTypeError(f"not a record id or range such as 7 or 10-20: {text!r}")
    return list(range(int(first), int(last or first) + 1))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safetynet", description="Detect adversarial examples in front of Keras classifiers.")
    parser.add_argument("--version", action="version", version=f"safetynet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="classifier -> FGSM/PGD datasets -> detector -> report, in one go")
    _add_data(quick)
    quick.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    quick.add_argument("--eps", type=float, help="attack budget (default 0.3 for grayscale, 8/255 for colour)")
    quick.add_argument("--n-attack", type=int, default=10_000, help="training images to attack (default 10000)")
    quick.add_argument("--n-eval", type=int, help="test images to evaluate on (default all)")
    quick.add_argument("--classifier-epochs", type=int, default=10, help="training epochs of the classifier (default 10)")
    quick.add_argument("--detector-epochs", type=int, default=10, help="training epochs of each detector (default 10)")
    quick.add_argument("--target-fpr", type=float, default=0.05, help="clean false-positive rate to calibrate to")
    quick.add_argument("--family", default="input", choices=FAMILIES, help="detector family (default input)")
    quick.add_argument("--no-robust", action="store_true", help="skip the robust guard (harden) and the table of both guards")
    quick.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of an earlier quickstart in --out (without it, an earlier run is refused)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    train = commands.add_parser("train-classifier", help="train the reference CNN (optionally adversarially) and save it as .keras")
    _add_data(train)
    train.add_argument("--out", required=True, help="output .keras file")
    train.add_argument("--epochs", type=int, default=10, help="at most this many epochs (early stopping; default 10)")
    train.add_argument("--batch-size", type=int, default=128, help="default 128")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--adversarial", metavar="SPEC", type=_training_attack_spec,
                       help="adversarial training against this attack, made on the fly: pgd:eps=0.3,steps=40 (Madry), "
                       "fgsm_rs:eps=0.3 (fast, Wong et al.), bim, fgsm, mifgsm")
    train.add_argument("--adversarial-data", nargs="+", metavar="DIR",
                       help="train on these stored adversarial datasets (from `attack`, with true labels) mixed with clean data")
    train.add_argument("--mix", type=float, help="adversarial fraction of each batch (default 1 with --adversarial, 0.5 with --adversarial-data)")
    train.add_argument("--eps-warmup", type=float, default=0.0, metavar="EPOCHS", help="ramp eps up linearly over this many epochs")
    train.add_argument("--trades", type=float, metavar="BETA", help="TRADES loss with this beta (with --adversarial)")
    train.add_argument("--robust-n", type=int,
                       help="test images for the robust accuracy report (PGD-40 x 5, CW-L2 on 100); default 1000 "
                       "when training adversarially, else none")

    harden = commands.add_parser("harden", help="classifier -> robust guard: adversarial fine-tuning, joint detector, one threshold, report")
    harden.add_argument("--model", required=True, help="your classifier (.keras or .h5), fine-tuned into the guard's")
    _add_data(harden)
    harden.add_argument("--out", required=True, help="new output folder: classifier.keras, datasets/, detector/, guard/, report/")
    harden.add_argument("--attack", default="pgd:steps=10", metavar="SPEC", type=_training_attack_spec,
                        help="training attack: pgd:steps=10 (default, PGD-AT), fgsm_rs (fast, for CPUs)")
    harden.add_argument("--eps", type=float, help="the guard's budget (default 0.3 for grayscale, 8/255 for colour)")
    harden.add_argument("--epochs", type=int, default=20, help="at most this many (early stop on robust validation accuracy)")
    harden.add_argument("--eps-warmup", type=float, default=3.0, metavar="EPOCHS", help="ramp eps up over this many epochs (default 3)")
    harden.add_argument("--trades", type=float, metavar="BETA", help="TRADES loss with this beta instead of PGD-AT")
    harden.add_argument("--learning-rate", type=float, default=5e-4, help="Adam's learning rate at the start (default 5e-4)")
    harden.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                        help="learning rate over the epochs (default cosine: decays to 2%%)")
    harden.add_argument("--batch-size", type=int, default=128, help="default 128")
    harden.add_argument("--patience", type=int, default=4, help="epochs without robust improvement before stopping")
    harden.add_argument("--family", default="input", choices=[f for f in FAMILIES if f not in ("joint", "ensemble")],
                        help="detector family inside the joint rule (default input)")
    harden.add_argument("--target-fpr", type=float, default=0.05, help="clean false-positive rate of the one threshold")
    harden.add_argument("--n-attack", type=int, default=10_000, help="training images attacked for the detector")
    harden.add_argument("--n-eval", type=int, default=1000, help="test images to evaluate on (default 1000)")
    harden.add_argument("--no-evaluate", action="store_true", help="skip the evaluation report")
    harden.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    attack = commands.add_parser("attack", help="write an adversarial dataset for a saved classifier")
    attack.add_argument("--model", required=True, help=".keras or .h5 classifier")
    _add_data(attack)
    attack.add_argument("--attack", required=True, type=_attack_spec, help="attack name or spec name[:key=value,...], e.g. pgd:eps=0.3,steps=10")
    attack.add_argument("--eps", type=float, help="perturbation budget (default 0.3 for grayscale, 8/255 for colour)")
    attack.add_argument("--steps", type=int, help="iterations (iterative attacks)")
    attack.add_argument("--step-size", type=float, help="per-step move (default 2.5 * eps / steps)")
    attack.add_argument("--norm", choices=("inf", "2"), help="perturbation norm (default inf)")
    attack.add_argument("--targets", choices=("random", "least_likely"), help="targeted attack: target classes")
    attack.add_argument("--surrogate", help="craft on this model instead and measure transfer to --model")
    attack.add_argument("--split", choices=("train", "test"), default="train", help="which split to attack (default train)")
    attack.add_argument("--n", type=int, help="number of images to attack (default all of the split)")
    attack.add_argument("--batch-size", type=int, default=256, help="images per compiled attack call (default 256)")
    attack.add_argument("--shard-size", type=int, default=10_000, help="examples per shard file (default 10000)")
    attack.add_argument("--shard", type=_part, default=(0, 1), metavar="I/N",
                        help="attack only the I-th of N contiguous parts (0-based), for N hosts; join with `dataset merge`")
    attack.add_argument("--out", required=True, help="output dataset directory (rerun the same command to resume)")

    dataset = commands.add_parser("dataset", help="inspect, verify and merge adversarial datasets")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    info = dataset_commands.add_parser("info", help="print a dataset's summary")
    info.add_argument("directory", help="dataset directory written by `attack`")
    verify = dataset_commands.add_parser("verify", help="check every shard against the manifest (exit 1 on problems)")
    verify.add_argument("directory", help="dataset directory written by `attack`")
    merge = dataset_commands.add_parser("merge", help="join the parts of a --shard I/N run into one dataset")
    merge.add_argument("parts", nargs="+", help="the part directories")
    merge.add_argument("--out", required=True, help="new dataset directory for the joined parts")

    detect = commands.add_parser("train-detector", help="fit and calibrate a detector on adversarial datasets")
    detect.add_argument("--adversarial", nargs="+", required=True, help="dataset directories written by `attack`")
    detect.add_argument("--out", required=True, help="output detector directory")
    detect.add_argument("--family", default="input", choices=FAMILIES,
                        help="detector family (default input; all others read the classifier: give --model)")
    detect.add_argument("--model", help="the classifier the datasets were made for (needed by all families but input)")
    detect.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS), choices=[f for f in FAMILIES if f != "ensemble"],
                        help=f"ensemble members (default: {' '.join(DEFAULT_MEMBERS)})")
    detect.add_argument("--target-fpr", type=float, default=0.05, help="clean false-positive rate to calibrate to (default 0.05)")
    detect.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    detect.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    retrain = commands.add_parser("retrain", help="fine-tune a detector on a new attack, replaying earlier data")
    retrain.add_argument("--detector", required=True, help="the detector directory to start from (left unchanged)")
    retrain.add_argument("--adversarial", nargs="+", required=True, help="dataset directories of the new attack(s)")
    retrain.add_argument("--replay", nargs="*", help="earlier datasets to replay (default: those the detector was trained on)")
    retrain.add_argument("--out", help="new detector directory (default: the next free DETECTOR.vN beside it)")
    retrain.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    retrain.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    evaluate = commands.add_parser("evaluate", help="detection rates per attack on the test split -> report.json")
    evaluate.add_argument("--model", required=True, help=".keras or .h5 classifier")
    evaluate.add_argument("--detector", required=True, help="detector directory (train-detector or retrain)")
    _add_data(evaluate)
    evaluate.add_argument("--attacks", nargs="*", type=_attack_spec, help="attack specs (default: those the detector was trained on)")
    evaluate.add_argument("--n", type=int, help="test images to use (default all)")
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per compiled attack call (default 256)")
    evaluate.add_argument("--targets", choices=("random", "least_likely"), help="run the attacks targeted")
    evaluate.add_argument("--eps-sweep", nargs="+", type=_fraction, metavar="EPS",
                          help="run every attack that has an eps at each of these values, e.g. 0.1 0.2 0.3 or 4/255 8/255")
    evaluate.add_argument("--no-adaptive", action="store_true", help="skip the adaptive attacks (which know the detector)")
    evaluate.add_argument("--adaptive-steps", type=int, default=ADAPTIVE_STEPS,
                          help=f"iterations of each adaptive attack, per lambda and restart (default {ADAPTIVE_STEPS})")
    evaluate.add_argument("--adaptive-restarts", type=int, default=1, help="random restarts of the APGD, orthogonal and selective attacks")
    evaluate.add_argument("--adaptive-targets", type=int, default=9,
                          help="the targeted APGD-DLR aims at this many of the most likely other classes (default 9)")
    evaluate.add_argument("--adaptive-suite", nargs="+", choices=ADAPTIVE_SUITE, default=list(ADAPTIVE_SUITE),
                          help="which adaptive attacks run (default all; the row is the worst case per input over them)")
    evaluate.add_argument("--lambdas", nargs="+", type=float, default=[0.1, 1.0, 10.0],
                          help="weights of the detector term swept by adaptive_pgd (default 0.1 1 10)")
    evaluate.add_argument("--adaptive-n", type=int, default=1000,
                          help="run the adaptive attacks on the first N test images (default 1000)")
    evaluate.add_argument("--adaptive-loss", choices=("margin", "ce"), default="margin",
                          help="classifier term of the adaptive attack: C&W logit margin (default) or cross-entropy")
    evaluate.add_argument("--cross-attack", action="store_true",
                          help="also train an input detector per attack for the cross-attack matrix (slow)")
    evaluate.add_argument("--cross-attack-n", type=int, default=2000, help="training images per cross-attack detector")
    evaluate.add_argument("--cross-attack-epochs", type=int, default=3, help="training epochs per cross-attack detector (default 3)")
    evaluate.add_argument("--html", action="store_true", help="also write report.html (tables and figures in one file)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    evaluate.add_argument("--out", required=True, help="output folder for report.json, report.md and plots/")

    quarantine = commands.add_parser("quarantine", help="inspect a guard's quarantine store and export it for retraining")
    quarantine_commands = quarantine.add_subparsers(dest="quarantine_command", required=True)
    quarantine_info = quarantine_commands.add_parser("info", help="print a quarantine store's summary")
    quarantine_info.add_argument("--store", required=True, help="quarantine directory (serve --quarantine)")
    quarantine_export = quarantine_commands.add_parser(
        "export", help="write quarantined inputs as an adversarial-only dataset (for retrain --adversarial)")
    quarantine_export.add_argument("--store", required=True, help="quarantine directory (serve --quarantine)")
    quarantine_export.add_argument("--out", required=True, help="new dataset directory")
    quarantine_export.add_argument("--include", choices=("rejected", "all"), default="rejected",
                                   help="rejected inputs only (default), or sampled accepted ones too")
    quarantine_export.add_argument("--since", metavar="ISO", help="only records from this UTC time on, e.g. 2024-05-01T00:00:00Z")
    quarantine_export.add_argument("--model", help="only records of this guard name")
    quarantine_export.add_argument("--include-unreviewed", action="store_true",
                                   help="export records nobody reviewed too (default: only those marked adversarial; "
                                   "records marked clean or unsure are never exported)")
    quarantine_list = quarantine_commands.add_parser("list", help="list quarantined records (no images)")
    quarantine_list.add_argument("--store", required=True, help="quarantine directory (serve --quarantine)")
    quarantine_list.add_argument("--review", choices=("adversarial", "clean", "unsure", "unreviewed"),
                                 help="only records with this review")
    quarantine_list.add_argument("--verdict", choices=("rejected", "accepted"), help="only records with this verdict")
    quarantine_list.add_argument("--limit", type=int, default=50, help="most records to list (default 50)")
    quarantine_list.add_argument("--after-id", type=int, default=0, metavar="ID", help="list records after this id")
    quarantine_show = quarantine_commands.add_parser("show", help="print one record's fields, optionally write its image")
    quarantine_show.add_argument("--store", required=True, help="quarantine directory (serve --quarantine)")
    quarantine_show.add_argument("--id", type=int, required=True, help="record id (from quarantine list)")
    quarantine_show.add_argument("--png", metavar="FILE", help="write the image as a PNG here")
    quarantine_show.add_argument("--clip", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                                 help="the guard's pixel range, mapped to 0..255 in the PNG (default 0 1)")
    quarantine_mark = quarantine_commands.add_parser(
        "mark", help="mark records adversarial, clean (a false positive: never exported) or unsure")
    quarantine_mark.add_argument("--store", required=True, help="quarantine directory (serve --quarantine)")
    quarantine_mark.add_argument("--id", type=_id_range, nargs="+", required=True, metavar="ID",
                                 help="record ids or ranges, e.g. 3 7 10-20")
    quarantine_mark.add_argument("--as", dest="review", choices=("adversarial", "clean", "unsure"), required=True,
                                 help="the review to record")
    quarantine_verify = quarantine_commands.add_parser(
        "verify", help="check the store's SQLite integrity and every image against its sha256")
    quarantine_verify.add_argument("--store", required=True, help="quarantine directory (serve --quarantine)")

    serve = commands.add_parser("serve", help="serve a guard over HTTP (TF-Serving-style REST, metrics, quarantine)")
    serve.add_argument("--guard", required=True, metavar="DIR", help="guard directory (Guard.save)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8501, help="default 8501")
    serve.add_argument("--upstream", metavar="URL", help="forward accepted inputs to this TF Serving model URL, e.g. http://host:8501/v1/models/x")
    serve.add_argument("--token", help="require Authorization: Bearer TOKEN (default: $SAFETYNET_TOKEN; none if unset)")
    serve.add_argument("--quarantine", metavar="DIR", help="store rejected inputs in this quarantine directory")
    serve.add_argument("--sample-accepted", type=float, default=0.0, metavar="F", help="fraction of accepted inputs to quarantine too")
    serve.add_argument("--max-batch", type=int, default=64, metavar="N", help="most instances per request (default 64)")
    serve.add_argument("--max-body-mb", type=float, default=32.0, metavar="M", help="largest request body in MiB (default 32)")
    serve.add_argument("--policy", choices=("reject", "flag"), help="override the guard's saved policy")
    serve.add_argument("--scores-for-rejected", action="store_true",
                       help="answer the detector's score for rejected inputs too (trusted callers only: it guides attacks)")
    serve.add_argument("--probability-decimals", type=int, metavar="D", help="round answered probabilities to D decimals")
    serve.add_argument("--top-k", type=int, metavar="K", help="answer only the K largest probabilities (the rest 0)")
    serve.add_argument("--head-timeout", type=float, default=10.0, metavar="S",
                       help="seconds for a request line and headers to arrive (default 10)")
    serve.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                       help="seconds for a request body to arrive (default 30)")
    serve.add_argument("--keep-alive", type=float, default=5.0, metavar="S", help="idle keep-alive timeout (default 5)")
    serve.add_argument("--max-head-kb", type=float, default=16.0, metavar="K",
                       help="largest request line plus headers in KiB (default 16; 414/431 beyond)")
    serve.add_argument("--tokens", metavar="FILE", help='per-client tokens, a JSON file {"client name": "token"}: '
                       "each client's queries are tracked apart (instead of --token)")
    serve.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDR",
                       help="a reverse proxy (address or CIDR) whose X-Forwarded-For names the client (repeatable)")
    serve.add_argument("--query-policy", choices=("block", "reject", "flag", "off"), default="block",
                       help="query-attack detection: what a client's near copy of a recent query gets (default block: "
                       "rejected, and the client refused with 429 for --query-block-seconds)")
    serve.add_argument("--query-block-seconds", type=float, default=600.0, metavar="S", help="default 600")
    serve.add_argument("--query-state", default="memory", metavar="URL",
                       help="where query fingerprints live: memory (default, this process) or redis://host:6379/0 "
                       "(shared by replicas; pip install 'safetynet[redis]')")

    guard = commands.add_parser("guard", help="write a guard directory (classifier + detector + policy) for serve, export and demo")
    guard.add_argument("--model", help=".keras or .h5 classifier (leave out for a detector that does not read it, "
                       "in front of a remote classifier: serve --upstream)")
    guard.add_argument("--detector", required=True, help="detector directory (train-detector or retrain)")
    guard.add_argument("--out", required=True, help="new guard directory (replaced whole if it exists)")
    guard.add_argument("--name", default="safetynet", help="model name in the REST paths (default %(default)s)")
    guard.add_argument("--policy", choices=("reject", "flag"), default="reject", help="reject flagged inputs, or only flag them")

    export = commands.add_parser("export", help="write a guard as one TensorFlow SavedModel (input and activations detectors)")
    export.add_argument("--guard", required=True, help="guard directory (Guard.save)")
    export.add_argument("--out", required=True, help="output SavedModel directory (replaced whole if it exists)")
    export.add_argument("--scores-for-rejected", action="store_true",
                        help="keep adversarial_score on rejected rows (default NaN, as the HTTP service answers null)")

    demo = commands.add_parser("demo", help="interactive epsilon demo in the browser (needs the demo extra)")
    demo_source = demo.add_mutually_exclusive_group()
    demo_source.add_argument("--guard", help="guard directory (Guard.save): its classifier and detector")
    demo_source.add_argument("--model", help=".keras or .h5 classifier taking [0, 1] images "
                             "(default: ImageNet MobileNet 0.75 from the Keras cache, $KERAS_HOME/models)")
    demo_source.add_argument("--save-model", metavar="PATH",
                             help="write the default classifier as a .keras file (for `attack --model`) and exit")
    demo.add_argument("--detector", help="detector directory to put in front of --model or the default classifier")
    demo.add_argument("--examples", default="../shared/data/photos", help="folder of example images (default %(default)s)")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from safetynet.startup import load_keras_quietly

    load_keras_quietly()
    from training import workflow

    if args.command == "quickstart":
        from training.quickstart import quickstart

        quickstart(
            args.data, args.out, eps=args.eps, n_attack=args.n_attack, n_eval=args.n_eval,
            classifier_epochs=args.classifier_epochs, detector_epochs=args.detector_epochs,
            target_fpr=args.target_fpr, family=args.family, robust=not args.no_robust, seed=args.seed,
            overwrite=args.overwrite,
        )
    elif args.command == "train-classifier":
        workflow.train_classifier_stage(
            args.data, args.out, epochs=args.epochs, seed=args.seed, adversarial=args.adversarial,
            adversarial_data=args.adversarial_data or (), mix=args.mix, eps_warmup=args.eps_warmup,
            trades_beta=args.trades, batch_size=args.batch_size, robust_n=args.robust_n,
        )
    elif args.command == "harden":
        from training.harden import HardenSettings, harden

        settings = HardenSettings(
            attack=args.attack, eps=args.eps, epochs=args.epochs, warmup_epochs=args.eps_warmup, trades_beta=args.trades,
            learning_rate=args.learning_rate, schedule=args.schedule, batch_size=args.batch_size, patience=args.patience,
            family=args.family,
            n_attack=args.n_attack, target_fpr=args.target_fpr, seed=args.seed,
        )
        harden(args.model, args.data, args.out, settings, evaluate=not args.no_evaluate, n_eval=args.n_eval)
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
        from detector.adaptive_evaluation import AdaptiveSettings

        workflow.evaluate_stage(
            args.model, args.detector, args.data, args.out,
            attacks=args.attacks, n=args.n, batch_size=args.batch_size, targets=args.targets, eps_sweep=args.eps_sweep,
            adaptive=None if args.no_adaptive else AdaptiveSettings(
                steps=args.adaptive_steps, lambdas=tuple(args.lambdas), loss=args.adaptive_loss, max_inputs=args.adaptive_n,
                restarts=args.adaptive_restarts, target_classes=args.adaptive_targets, suite=tuple(args.adaptive_suite)),
            cross_attack=args.cross_attack, cross_attack_n=args.cross_attack_n,
            cross_attack_epochs=args.cross_attack_epochs, html=args.html, seed=args.seed, command=sys.argv,
        )
    elif args.command == "quarantine":
        from serving import quarantine_export, quarantine_index, quarantine_review

        if args.quarantine_command == "info":
            print("\n".join(quarantine_export.describe_quarantine(args.store)))
        elif args.quarantine_command == "list":
            records = quarantine_review.list_records(args.store, review=args.review, verdict=args.verdict,
                                                     limit=args.limit, after_id=args.after_id)
            print("\n".join(quarantine_review.describe_records(records)))
        elif args.quarantine_command == "show":
            print("\n".join(quarantine_review.describe_record(args.store, args.id, args.png, tuple(args.clip))))
        elif args.quarantine_command == "mark":
            marked = quarantine_review.mark_records(args.store, [i for ids in args.id for i in ids], args.review)
            print(f"marked {marked} records {args.review}")
        elif args.quarantine_command == "verify":
            print(f"ok: {quarantine_index.verify_store(args.store)['records']} records verified")
        else:
            manifest = quarantine_export.export_quarantine(args.store, args.out, include=args.include, since=args.since,
                                                           model=args.model, unreviewed=args.include_unreviewed)
            workflow.dataset_info(args.out)
            print(quarantine_export.describe_left_out(manifest))
    elif args.command == "serve":
        from serving.answers import AnswerPolicy
        from serving.server import serve

        serve(
            args.guard, host=args.host, port=args.port, upstream=args.upstream, token=args.token,
            quarantine_dir=args.quarantine, sample_accepted=args.sample_accepted, max_batch=args.max_batch,
            max_body_mb=args.max_body_mb, policy=args.policy,
            answers=AnswerPolicy(args.scores_for_rejected, args.probability_decimals, args.top_k),
            head_timeout=args.head_timeout, body_timeout=args.body_timeout, keep_alive=args.keep_alive,
            max_head_kb=args.max_head_kb, tokens_file=args.tokens, trusted_proxies=tuple(args.trusted_proxy),
            query_policy=args.query_policy, query_state=args.query_state, query_block_seconds=args.query_block_seconds,
        )
    elif args.command == "guard":
        from serving.guard import Guard

        out = Guard.from_paths(args.model, args.detector, name=args.name, policy=args.policy).save(args.out)
        print(f"guard {args.name!r} ({args.policy}) written to {out}")
    elif args.command == "export":
        from serving.export import export_guard_directory

        out = export_guard_directory(args.guard, args.out, scores_for_rejected=args.scores_for_rejected)
        print(f"exported {out} (signature serving_default)")
    elif args.command == "demo" and args.save_model:
        from serving.demo_model import save_default_model

        print(f"saved {save_default_model(args.save_model)} (ImageNet MobileNet taking [0, 1] RGB images)")
    elif args.command == "demo":
        from serving.demo import run_demo

        run_demo(guard=args.guard, model=args.model, detector=args.detector, examples=args.examples,
                 host=args.host, port=args.port)
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
