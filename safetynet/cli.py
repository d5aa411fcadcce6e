"""The `safetynet` command: parses arguments (`safetynet.parser`) and calls the pipeline's stages
(`training.workflow`, `serving.commands`); no logic of its own.

Nothing heavy is imported until the arguments parse: attack names, data specs and choices are checked
first, so a typo costs a fraction of a second and prints one line, with no TensorFlow start-up noise.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from safetynet.arguments import EXIT_USAGE
from safetynet.parser import build_parser

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SERVING_COMMANDS = ("quarantine", "serve", "guard", "export", "demo")


def _run(args: argparse.Namespace) -> int:
    from safetynet.startup import load_keras_quietly

    load_keras_quietly()
    return (_serving if args.command in SERVING_COMMANDS else _pipeline)(args)


def _pipeline(args: argparse.Namespace) -> int:
    """The commands that train, attack, fit and evaluate (`training`)."""
    from training import workflow

    if args.command == "quickstart":
        from training.quickstart import quickstart

        quickstart(
            args.data, args.out, eps=args.eps, n_attack=args.n_attack, n_eval=args.n_eval, adaptive_n=args.adaptive_n,
            classifier_epochs=args.classifier_epochs, detector_epochs=args.detector_epochs,
            target_fpr=args.target_fpr, family=args.family, robust=not args.no_robust, seed=args.seed,
            overwrite=args.overwrite, benign_augmentation=not args.no_benign_augmentation, shifted_fpr=args.shifted_fpr,
        )
    elif args.command == "train-classifier":
        from training.classifier_stage import train_classifier_stage

        train_classifier_stage(
            args.data, args.out, epochs=args.epochs, seed=args.seed, adversarial=args.adversarial,
            adversarial_data=args.adversarial_data or (), mix=args.mix, eps_warmup=args.eps_warmup,
            trades_beta=args.trades, batch_size=args.batch_size, robust_n=args.robust_n, devices=args.devices,
            architecture=args.architecture, width=args.width, augment=args.augment,
        )
    elif args.command == "harden":
        from training.harden import HardenSettings, harden

        settings = HardenSettings(
            attack=args.attack, eps=args.eps, epochs=args.epochs, warmup_epochs=args.eps_warmup, trades_beta=args.trades,
            learning_rate=args.learning_rate, schedule=args.schedule, optimizer=args.optimizer, augment=args.augment,
            ema=args.ema, batch_size=args.batch_size, patience=args.patience,
            family=args.family, n_attack=args.n_attack, target_fpr=args.target_fpr, seed=args.seed,
            benign_augmentation=not args.no_benign_augmentation, shifted_fpr=args.shifted_fpr,
        )
        harden(args.model, args.data, args.out, settings, evaluate=not args.no_evaluate, n_eval=args.n_eval, devices=args.devices)
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
            benign_augmentation=not args.no_benign_augmentation, shifted_fpr=args.shifted_fpr, calibrate_on=args.calibrate_on,
        )
    elif args.command == "retrain":
        workflow.retrain_stage(args.detector, args.adversarial, model_path=args.model, replay=args.replay, out=args.out,
                               epochs=args.epochs, seed=args.seed, benign_augmentation=not args.no_benign_augmentation,
                               shifted_fpr=args.shifted_fpr, calibrate_on=args.calibrate_on)
    elif args.command == "evaluate":
        from detector.adaptive_evaluation import AdaptiveSettings
        from training.evaluate_stage import evaluate_stage

        evaluate_stage(
            args.model, args.detector, args.data, args.out,
            attacks=args.attacks, n=args.n, batch_size=args.batch_size, targets=args.targets, eps_sweep=args.eps_sweep,
            adaptive=None if args.no_adaptive else AdaptiveSettings(
                steps=args.adaptive_steps, lambdas=tuple(args.lambdas), loss=args.adaptive_loss, max_inputs=args.adaptive_n,
                restarts=args.adaptive_restarts, target_classes=args.adaptive_targets, suite=tuple(args.adaptive_suite)),
            cross_attack=args.cross_attack, cross_attack_n=args.cross_attack_n,
            cross_attack_epochs=args.cross_attack_epochs, html=args.html, seed=args.seed, command=sys.argv,
        )
    return 0


def _serving(args: argparse.Namespace) -> int:
    """The commands that build, serve and look after a guard (`serving`)."""
    from serving import commands as serving

    if args.command == "quarantine":
        if args.quarantine_command == "info":
            serving.quarantine_info(args.store)
        elif args.quarantine_command == "list":
            serving.quarantine_list(args.store, review=args.review, verdict=args.verdict, limit=args.limit,
                                    after_id=args.after_id)
        elif args.quarantine_command == "show":
            serving.quarantine_show(args.store, args.id, args.png, args.clip)
        elif args.quarantine_command == "mark":
            serving.quarantine_mark(args.store, [i for ids in args.id for i in ids], args.review)
        elif args.quarantine_command == "verify":
            serving.quarantine_verify(args.store)
        else:
            serving.quarantine_to_dataset(args.store, args.out, include=args.include, since=args.since,
                                          model=args.model, unreviewed=args.include_unreviewed)
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
            query_between_window=args.query_between_window,
        )
    elif args.command == "guard":
        serving.write_guard(args.model, args.detector, args.out, name=args.name, policy=args.policy)
    elif args.command == "export":
        serving.export_guard(args.guard, args.out, scores_for_rejected=args.scores_for_rejected)
    elif args.command == "demo" and args.save_model:
        serving.save_demo_model(args.save_model)
    elif args.command == "demo":
        from serving.demo import run_demo

        run_demo(guard=args.guard, model=args.model, detector=args.detector, examples=args.examples,
                 host=args.host, port=args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors in the user's input print one line and exit 2 (SAFETYNET_DEBUG=1 shows the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("SAFETYNET_DEBUG"):
            raise
        print(f"safetynet {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
