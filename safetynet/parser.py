"""The `safetynet` command's argparse definitions: every sub-command, its options and their help.

Types and names come from `safetynet.arguments`, so parsing imports nothing heavy.
"""
from __future__ import annotations

import argparse

from safetynet import __version__
from safetynet.arguments import (
    ADAPTIVE_STEPS,
    ADAPTIVE_SUITE,
    COLOUR_MEMBERS,
    DEFAULT_MEMBERS,
    FAMILIES,
    OneLineParser,
    add_adaptive_n_option,
    add_architecture_options,
    add_benign_options,
    add_data_option,
    add_devices_option,
    add_hardening_options,
    attack_spec,
    fraction,
    id_range,
    part,
    training_attack_spec,
)

Commands = argparse._SubParsersAction  # what add_subparsers returns


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, sub-commands in the order --help lists them."""
    parser = OneLineParser(prog="safetynet", description="Detect adversarial examples in front of Keras classifiers.")
    parser.add_argument("--version", action="version", version=f"safetynet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_training, _add_datasets, _add_detectors, _add_quarantine, _add_serving):
        add(commands)
    for fits in ("quickstart", "harden", "train-detector", "retrain"):  # the commands that fit a detector
        add_benign_options(commands.choices[fits], keeps_detector_cap=fits == "retrain", names_images=fits in ("train-detector", "retrain"))
    for trains in ("train-classifier", "harden"):  # the commands that train adversarially
        add_devices_option(commands.choices[trains])
    return parser


def _add_training(commands: Commands) -> None:
    """quickstart, train-classifier and harden: the commands that train a classifier."""
    quick = commands.add_parser("quickstart", help="classifier -> FGSM/PGD datasets -> detector -> report, in one go")
    add_data_option(quick)
    quick.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    quick.add_argument("--eps", type=float, help="attack budget (default 0.3 for grayscale, 8/255 for colour)")
    quick.add_argument("--n-attack", type=int, default=10_000, help="training images to attack (default 10000)")
    quick.add_argument("--n-eval", type=int, help="test images to evaluate on (default all)")
    add_adaptive_n_option(quick)
    quick.add_argument("--classifier-epochs", type=int, default=10, help="training epochs of the classifier (default 10)")
    quick.add_argument("--detector-epochs", type=int, default=10, help="training epochs of each detector (default 10)")
    quick.add_argument("--target-fpr", type=float, default=0.05, help="clean false-positive rate to calibrate to")
    quick.add_argument("--family", default="input", choices=FAMILIES, help="detector family (default input)")
    quick.add_argument("--no-robust", action="store_true", help="skip the robust guard (harden) and the table of both guards")
    quick.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart's outputs in --out (without it a finished run is refused and an interrupted one of the same command resumes)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    train = commands.add_parser("train-classifier", help="train the reference CNN or a ResNet (optionally adversarially), save it as .keras")
    add_data_option(train)
    train.add_argument("--out", required=True, help="output .keras file")
    train.add_argument("--epochs", type=int, default=10,
                       help="default 10: at most, early-stopped (reference); exactly, one-cycle schedule (resnet)")
    add_architecture_options(train)
    train.add_argument("--batch-size", type=int, default=128, help="default 128")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--adversarial", metavar="SPEC", type=training_attack_spec,
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
    add_data_option(harden)
    harden.add_argument("--out", required=True, help="new output folder: classifier.keras, datasets/, detector/, guard/, report/ (rerun the same command to resume)")
    harden.add_argument("--attack", default="pgd:steps=10", metavar="SPEC", type=training_attack_spec,
                        help="training attack: pgd:steps=10 (default, PGD-AT), pgd:steps=4 (CPUs), fgsm_rs (fastest, weaker)")
    harden.add_argument("--eps", type=float, help="the guard's budget (default 0.3 for grayscale, 8/255 for colour)")
    harden.add_argument("--epochs", type=int, default=20, help="at most this many (early stop on robust validation accuracy)")
    harden.add_argument("--eps-warmup", type=float, default=3.0, metavar="EPOCHS", help="ramp eps up over this many epochs (default 3)")
    harden.add_argument("--trades", type=float, metavar="BETA", help="TRADES loss with this beta instead of PGD-AT")
    add_hardening_options(harden)
    harden.add_argument("--batch-size", type=int, default=128, help="default 128")
    harden.add_argument("--patience", type=int, default=4, help="epochs without robust improvement before stopping")
    harden.add_argument("--family", default="input", choices=[f for f in FAMILIES if f not in ("joint", "ensemble")],
                        help="detector family inside the joint rule (default input)")
    harden.add_argument("--target-fpr", type=float, default=0.05, help="clean false-positive rate of the one threshold")
    harden.add_argument("--n-attack", type=int, default=10_000, help="training images attacked for the detector")
    harden.add_argument("--n-eval", type=int, default=1000, help="test images to evaluate on (default 1000)")
    harden.add_argument("--no-evaluate", action="store_true", help="skip the evaluation report")
    harden.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_datasets(commands: Commands) -> None:
    """attack and dataset: writing adversarial datasets and looking after them."""
    attack = commands.add_parser("attack", help="write an adversarial dataset for a saved classifier")
    attack.add_argument("--model", required=True, help=".keras or .h5 classifier")
    add_data_option(attack)
    attack.add_argument("--attack", required=True, type=attack_spec, help="attack name or spec name[:key=value,...], e.g. pgd:eps=0.3,steps=10")
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
    attack.add_argument("--shard", type=part, default=(0, 1), metavar="I/N",
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


def _add_detectors(commands: Commands) -> None:
    """train-detector, retrain and evaluate."""
    detect = commands.add_parser("train-detector", help="fit and calibrate a detector on adversarial datasets")
    detect.add_argument("--adversarial", nargs="+", required=True, help="dataset directories written by `attack`")
    detect.add_argument("--out", required=True, help="output detector directory")
    detect.add_argument("--family", default="input", choices=FAMILIES,
                        help="detector family (default input; all others read the classifier: give --model)")
    detect.add_argument("--model", help="the classifier the datasets were made for (needed by all families but input)")
    detect.add_argument("--members", nargs="+", choices=[f for f in FAMILIES if f not in ("ensemble", "joint")],
                        help=f"ensemble members (default: {' '.join(DEFAULT_MEMBERS)}; for colour images "
                             f"{' '.join(COLOUR_MEMBERS)})")
    detect.add_argument("--target-fpr", type=float, default=0.05, help="clean false-positive rate to calibrate to (default 0.05)")
    detect.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    detect.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    retrain = commands.add_parser("retrain", help="retrain a detector on a new attack, replaying earlier data")
    retrain.add_argument("--detector", required=True, help="the detector directory to start from (left unchanged)")
    retrain.add_argument("--adversarial", nargs="+", required=True, help="dataset directories of the new attack(s)")
    retrain.add_argument("--replay", nargs="*", help="earlier datasets to replay (default: those the detector was trained on)")
    retrain.add_argument("--out", help="new detector directory (default: the next free DETECTOR.vN beside it)")
    retrain.add_argument("--model", help="the datasets' classifier (every family but input is fitted again and needs it)")
    retrain.add_argument("--epochs", type=int, help="fine-tuning epochs of input (default 5); training epochs of a"
                                                    " refit (default: those its members had)")
    retrain.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    evaluate = commands.add_parser("evaluate", help="detection rates per attack on the test split -> report.json")
    evaluate.add_argument("--model", required=True, help=".keras or .h5 classifier")
    evaluate.add_argument("--detector", required=True, help="detector directory (train-detector or retrain)")
    add_data_option(evaluate)
    evaluate.add_argument("--attacks", nargs="*", type=attack_spec, help="attack specs (default: those the detector was trained on)")
    evaluate.add_argument("--n", type=int, help="test images to use (default all)")
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per compiled attack call (default 256)")
    evaluate.add_argument("--targets", choices=("random", "least_likely"), help="run the attacks targeted")
    evaluate.add_argument("--eps-sweep", nargs="+", type=fraction, metavar="EPS",
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
    add_adaptive_n_option(evaluate)
    evaluate.add_argument("--adaptive-loss", choices=("margin", "ce"), default="margin",
                          help="classifier term of the adaptive attack: C&W logit margin (default) or cross-entropy")
    evaluate.add_argument("--cross-attack", action="store_true",
                          help="also train an input detector per attack for the cross-attack matrix (slow)")
    evaluate.add_argument("--cross-attack-n", type=int, default=2000, help="training images per cross-attack detector")
    evaluate.add_argument("--cross-attack-epochs", type=int, default=3, help="training epochs per cross-attack detector (default 3)")
    evaluate.add_argument("--html", action="store_true", help="also write report.html (tables and figures in one file)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    evaluate.add_argument("--out", required=True, help="output folder for report.json, report.md and plots/")


def _add_quarantine(commands: Commands) -> None:
    """quarantine info|export|list|show|mark|verify: a guard's quarantine store."""
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
    quarantine_mark.add_argument("--id", type=id_range, nargs="+", required=True, metavar="ID",
                                 help="record ids or ranges, e.g. 3 7 10-20")
    quarantine_mark.add_argument("--as", dest="review", choices=("adversarial", "clean", "unsure"), required=True,
                                 help="the review to record")
    quarantine_verify = quarantine_commands.add_parser(
        "verify", help="check the store's SQLite integrity and every image against its sha256")
    quarantine_verify.add_argument("--store", required=True, help="quarantine directory (serve --quarantine)")


def _add_serving(commands: Commands) -> None:
    """serve, guard, export and demo: the guard in front of a classifier."""
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
    serve.add_argument("--query-between-window", type=int, default=32, metavar="N",
                       help="also match a query that lies between two of its client's last N queries in every pixel "
                       "(a binary or line search of HopSkipJump, Boundary); 0 turns it off (default 32)")

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
