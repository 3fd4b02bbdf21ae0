"""The `exme` command: ExMe on runs that already finished, and one candidate written as a model.

    exme run RUN_DIR --tasks my_task --include-path tasks/      # rank, sweep, choose, save RUN_DIR/exme/
    exme run RUN_DIR --eval-data val.jsonl                      # scored by the eval loss on a local file
    exme apply --base BASE --checkpoint A --checkpoint B --alpha1 0.2 --alpha2 0.1 --beta 0.5 OUT
    exme kinship BASE A B [C ...]                              # how related the checkpoints are (--json)

A thin shell over the library: `runs` reads the run and builds the plane, `pipeline.run` does what the callback's
`on_train_end` does. Exit status: 0 on success, 1 when the work fails for a reason the library names (a missing or
corrupt checkpoint, a metric the history lacks, an unwritable output: `errors.ExMeError`), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import MISSING, fields

from .errors import ExMeError
from .kinship import METRICS
from .settings import SearchSettings
from .strategies import exme_coefficients

__all__ = ["add_settings_options", "main"]

EPILOG = "Every model is a point base + sum_i c_i * (checkpoint_i - base); nothing is unpickled."
DTYPES = ("auto", "float32", "bfloat16", "float16")
GROUPS = {"search": "search", "strategy": "strategy (see the README's Strategies section)"}


def _number_or(word: str):
    """An option's type: a number, or `word` (`--min-gain significant`, `--alphas auto`)."""

    def parse(value: str) -> float | str:
        if value == word:
            return value
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number >= 0 or {word!r}, got {value!r}") from None

    return parse


class _Help(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one worth saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is not None and default is not False and default != argparse.SUPPRESS and "default:" not in text:
            shown = " ".join(f"{v:g}" for v in default) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})".replace("%", "%%")
        return text


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per `SearchSettings` field (`--top-k` for `top_k`), with the field's help, choices and default, in
    the field's group: the command line and the library's settings cannot drift apart."""
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for f in fields(SearchSettings):
        meta, option = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default if f.default_factory is MISSING else f.default_factory()
        if isinstance(default, bool):
            groups[meta["group"]].add_argument(option, action="store_true", default=default, help=meta["help"])
            continue
        kwargs = {k: meta[k] for k in ("choices", "nargs", "metavar") if k in meta}
        kwargs["type"] = _number_or(meta["word"]) if "word" in meta else meta.get("type")  # a number or a word
        default = list(default) if isinstance(default, tuple) else default
        groups[meta["group"]].add_argument(option, default=default, help=meta["help"], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exme", description="Extrapolation Merging (ExMe) of a fine-tuning run's checkpoints.", epilog=EPILOG
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,apply,kinship}")
    _add_run_command(commands)
    _add_apply_command(commands)
    _add_kinship_command(commands)
    return parser


def _add_run_command(commands) -> None:
    run = commands.add_parser(
        "run",
        help="ExMe on a finished Trainer/SFTTrainer run",
        description="Rank a finished run's evaluated checkpoints, extrapolate the best two (EXPO), merge them (ExMe), "
        "score every candidate in-process and save the best with its report, as the callback does.",
        formatter_class=_Help,
    )
    run.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run's output folder (checkpoint-* and trainer_state.json)"
    )
    ranking = run.add_argument_group("which checkpoints")
    ranking.add_argument(
        "--metric",
        help="rank checkpoints by this metric of the run's log history (lower is better for names ending in 'loss'); "
        "default: the run's metric_for_best_model, else eval_loss",
    )
    ranking.add_argument(
        "--checkpoint",
        action="append",
        metavar="FOLDER",
        help="take these checkpoints (best first) instead of ranking",
    )
    _add_model_options(ranking)
    scoring = run.add_argument_group("scoring (one of --tasks or --eval-data)")
    scoring.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-eval tasks that choose the candidates")
    scoring.add_argument("--include-path", help="a folder of lm-eval task YAML files")
    scoring.add_argument(
        "--eval-data", metavar="FILE.jsonl", help="score by eval loss: text, prompt/completion or messages records"
    )
    scoring.add_argument("--heldout-tasks", nargs="+", metavar="TASK", help="lm-eval tasks for the held-out columns")
    scoring.add_argument(
        "--heldout-include-path", help="task YAML folder of --heldout-tasks (default: --include-path)"
    )
    scoring.add_argument("--heldout-data", metavar="FILE.jsonl", help="held-out eval loss data")
    scoring.add_argument("--limit", type=float, help="lm-eval: the first N documents of each task (a fraction if < 1)")
    scoring.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples (default: each task's own)")
    scoring.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    add_settings_options(run)
    output = run.add_argument_group("output")
    output.add_argument("--output-dir", help="where the result goes (default: RUN_DIR/exme)")
    output.add_argument(
        "--save-merged", action="store_true", help="LoRA: also save the chosen model fused, in merged/"
    )


def _add_apply_command(commands) -> None:
    apply = commands.add_parser(
        "apply",
        help="write one candidate as a loadable model folder",
        description="Write base + sum_i c_i * (checkpoint_i - base) as a model folder (config, tokenizer, "
        "safetensors), or as a PEFT adapter folder for LoRA checkpoints.",
        formatter_class=_Help,
    )
    apply.add_argument("output", metavar="OUT", nargs="?", help="the folder to write (replaced atomically)")
    apply.add_argument("--checkpoint", action="append", required=True, metavar="FOLDER", help="a checkpoint (repeat)")
    _add_model_options(apply)
    point = apply.add_mutually_exclusive_group(required=True)
    point.add_argument("--coefficients", nargs="+", metavar="C", help="c_i, one per --checkpoint")
    point.add_argument("--beta", type=float, help="ExMe: beta * EXPO-1(alpha1) + (1 - beta) * EXPO-2(alpha2)")
    apply.add_argument("--alpha1", type=float, default=0.0, help="with --beta: EXPO-1's extrapolation strength")
    apply.add_argument("--alpha2", type=float, default=0.0, help="with --beta: EXPO-2's extrapolation strength")
    apply.add_argument("--merged", action="store_true", help="LoRA: write the model fused into the base weights")


def _add_kinship_command(commands) -> None:
    kinship = commands.add_parser(
        "kinship",
        help="how related checkpoints are: the kinship of their task vectors",
        description="Model kinship (Hu et al. 2024) of checkpoints fine-tuned from one base: Pearson correlation, "
        "cosine similarity and Euclidean distance of their task vectors (checkpoint - base), every pair from one "
        "pass over the weights.",
        formatter_class=_Help,
    )
    kinship.add_argument("base", metavar="BASE", help="the base model id or folder")
    kinship.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="two or more checkpoint folders")
    kinship.add_argument("--metric", choices=METRICS, action="append", help="print only these (default: all three)")
    kinship.add_argument("--json", action="store_true", help="print JSON instead of tables")
    kinship.add_argument("--device", default="cpu", help="where the model is loaded (cpu, cuda, ...)")
    kinship.add_argument("--dtype", choices=DTYPES, default="auto", help="the model's dtype (auto: the checkpoint's)")


def _add_model_options(group) -> None:
    group.add_argument("--base", help="base model id or folder (default: the base the checkpoints record)")
    group.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1, ...)")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="the model's dtype (auto: the checkpoint's)")
    bits = group.add_mutually_exclusive_group()
    bits.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="LoRA: load the base in 4 bits (NF4, bitsandbytes), as a QLoRA run trained it (default: unquantized)",
    )
    bits.add_argument("--load-in-8bit", action="store_true", help="LoRA: load the base in 8 bits (bitsandbytes)")


def main(argv: list[str] | None = None) -> int:
    """The `exme` command; returns the exit status: 0 done, 1 when the work fails for a reason the message names
    (the library's own errors, `errors.ExMeError`, and corrupt safetensors files), 2 for bad usage. Anything else is
    a bug, and is raised with its traceback."""
    from safetensors import SafetensorError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    if _main_process():
        for name in ("exme_callback.pipeline", "exme_callback.journal"):  # the scores, the choice, a resumed sweep
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        if args.command == "run":
            _check_run_usage(parser, args)
            _run(args)
        elif args.command == "apply":
            _check_apply_usage(parser, args)
            _apply(args)
        else:
            if len(args.checkpoints) < 2:
                parser.error("kinship compares checkpoints: give at least two after BASE")
            _kinship(args)
    except ExMeError as error:
        print(f"exme: error: {error}", file=sys.stderr)
        return 1
    except SafetensorError as error:
        print(f"exme: error: a checkpoint file is corrupt ({error})", file=sys.stderr)
        return 1
    return 0


def _check_run_usage(parser, args) -> None:
    if bool(args.tasks) == bool(args.eval_data):
        parser.error("give one of --tasks (lm-eval) or --eval-data (eval loss on a file) to score candidates")
    if args.heldout_tasks and args.heldout_data:
        parser.error("give --heldout-tasks or --heldout-data, not both")
    if args.checkpoint and args.metric:
        parser.error("--metric ranks the run's checkpoints; with --checkpoint they are given: leave one out")
    names = [f.name for f in fields(SearchSettings)]
    values = {name: getattr(args, name) for name in names}
    if values["alphas"] == ["auto"]:  # `--alphas auto`
        values["alphas"] = "auto"
    try:
        args.settings = SearchSettings(**values)
    except (TypeError, ValueError) as error:  # named as the option, not the Python argument
        message = str(error)
        for name in names:
            message = message.replace(f"`{name}`", "--" + name.replace("_", "-"))
        parser.error(message)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit must be positive, got {args.limit:g}")
    if (args.load_in_4bit or args.load_in_8bit) and (args.settings.baselines or args.settings.dare is not None):
        parser.error("--baselines and --dare write dense weights into the base layers, which 4 or 8 bits cannot hold")


def _check_apply_usage(parser, args) -> None:
    if args.output is None and args.coefficients and not _is_number(args.coefficients[-1]):
        args.output = args.coefficients.pop()  # `--coefficients X Y OUT`: the list stops at the folder
    if args.output is None:
        parser.error("the following arguments are required: OUT")
    if args.coefficients is not None:
        if not all(_is_number(c) for c in args.coefficients):
            parser.error(f"--coefficients must be numbers, got {' '.join(args.coefficients)}")
        args.coefficients = [float(c) for c in args.coefficients]
    if args.coefficients is not None and len(args.coefficients) != len(args.checkpoint):
        parser.error(
            f"--coefficients needs one value per --checkpoint ({len(args.checkpoint)}), got {len(args.coefficients)}"
        )
    if args.beta is None and (args.alpha1 or args.alpha2):
        parser.error("--alpha1/--alpha2 go with --beta (an ExMe merge); with --coefficients give c_i directly")
    if args.beta is not None:
        if len(args.checkpoint) != 2:
            parser.error("--alpha1/--alpha2/--beta describe an ExMe merge of two checkpoints: give --checkpoint twice")
        args.coefficients = list(exme_coefficients(args.alpha1, args.alpha2, args.beta))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _say(message: str) -> None:
    """Progress for the person at the terminal (stderr: stdout is the report), from the main process."""
    if _main_process():
        print(message, file=sys.stderr, flush=True)


def _main_process() -> bool:
    """Whether this is the main process of a launcher's (`RANK` 0), or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def _model_options(args) -> dict:
    """How `load_plane` loads the base: `--dtype`, `--device`, `--load-in-4bit`, `--load-in-8bit`."""
    quantization = {"load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit}
    return {"dtype": _dtype(args.dtype), "device": args.device, **quantization}


def _run(args) -> None:
    """`exme run` in each process a launcher started (`torchrun`, `accelerate launch`: the evaluation is split across
    them, the main process writes), or in this one."""
    from .sharding import launched_processes

    with launched_processes(args.device) as device:
        args.device = device
        _sweep(args)


def _sweep(args) -> None:
    """`exme run`'s work: the checkpoints (ranked, or given), the live model and its plane, the scorers, then the
    pipeline, which scores the checkpoints and the base like every candidate."""
    from . import pipeline
    from .candidates import Checkpoint
    from .preflight import check_racing, check_writable
    from .runs import load_plane, rank_run

    destination = os.path.abspath(args.output_dir or os.path.join(args.run_dir, "exme"))
    if _main_process():
        check_writable(destination, "--output-dir")
    if args.checkpoint:
        folders = args.checkpoint
        steps = [_step_of(folder, i) for i, folder in enumerate(folders)]
    else:
        ranked = rank_run(args.run_dir, args.metric, keep=args.settings.top_k)
        direction = "higher" if ranked.greater_is_better else "lower"
        _say(
            f"Ranked by {ranked.metric} ({direction} is better): "
            + ", ".join(f"step {c.step} ({c.score:.6g})" for c in ranked.checkpoints)
        )
        if ranked.missing:
            _say(f"Skipped, no longer on disk (save_total_limit?): steps {ranked.missing}")
        folders = [ranked.folders[c.step] for c in ranked.checkpoints]
        steps = [c.step for c in ranked.checkpoints]
    loaded = load_plane(args.base, folders, save_merged=args.save_merged, **_model_options(args))
    try:
        scorer = _scorer(args.tasks, args.include_path, args.eval_data, loaded, args)
        check_racing(scorer.evaluator, args.settings)
        heldout = None
        if args.heldout_tasks or args.heldout_data:
            include = args.heldout_include_path or args.include_path
            heldout = _scorer(args.heldout_tasks, include, args.heldout_data, loaded, args)
    except BaseException:
        loaded.plane.close()
        raise
    folders = [os.path.abspath(folder) for folder in folders]
    sources = {"base_model": loaded.base, "checkpoints": folders, "adapter": loaded.adapter}
    report = pipeline.run(
        loaded.model,
        loaded.plane,
        [Checkpoint(step) for step in steps],
        scorer,
        pipeline.Output(
            destination,
            processing_class=loaded.tokenizer,
            sources=sources,
            write=_main_process(),
            show_progress=_main_process(),
        ),
        settings=args.settings,
        heldout=heldout,
        score_base=True,
    )
    if _main_process():
        print()
        print(report.to_markdown())


def _apply(args) -> None:
    """`exme apply`: one candidate, written as a model folder."""
    from .io import publish_dir
    from .runs import load_plane

    loaded = load_plane(args.base, args.checkpoint, **_model_options(args))
    plane = loaded.plane
    try:
        plane.apply(tuple(args.coefficients))
        with publish_dir(args.output) as folder:
            saved = plane.save(folder, merged=args.merged)
            for path in saved.values():
                if loaded.tokenizer is not None:
                    loaded.tokenizer.save_pretrained(path)
    finally:
        plane.close()
    terms = " + ".join(f"{c:g} * d{i + 1}" for i, c in enumerate(args.coefficients))
    print(f"Wrote base + {terms} to {os.path.abspath(args.output)}")


def _kinship(args) -> None:
    """`exme kinship`: every pair's kinship, as tables or JSON."""
    from .runs import load_plane

    loaded = load_plane(args.base, args.checkpoints, dtype=_dtype(args.dtype), device=args.device)
    try:
        gram = loaded.plane.gram()
    finally:
        loaded.plane.close()
    metrics = args.metric or list(METRICS)
    matrices = {metric: gram.matrix(metric) for metric in metrics}
    if args.json:
        print(json.dumps({"base": loaded.base, "checkpoints": args.checkpoints, **matrices}, indent=2))
        return
    names = [os.path.basename(os.path.normpath(folder)) for folder in args.checkpoints]
    for metric, matrix in matrices.items():
        print(f"\n{metric}:\n")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for name, row in zip(names, matrix, strict=True):
            print(f"| {name} | " + " | ".join(f"{value:.4f}" for value in row) + " |")


def _scorer(tasks, include_path, data, loaded, args):
    from .errors import MissingFileError
    from .evaluators import LMEvalEvaluator, LossEvaluator
    from .objective import Objective
    from .scoring import Scorer

    if loaded.tokenizer is None:
        raise MissingFileError(
            f"No tokenizer in the checkpoints or in the base {loaded.base}: scoring needs one. Save the tokenizer "
            "into the base folder (`tokenizer.save_pretrained(folder)`)."
        )
    if tasks:
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        evaluator = LMEvalEvaluator(
            tasks,
            loaded.tokenizer,
            include_path=include_path,
            limit=limit,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
        )
    else:
        evaluator = LossEvaluator(data, loaded.tokenizer, batch_size=args.batch_size)
    return Scorer(evaluator, Objective.for_evaluator(evaluator))


def _step_of(folder: str, index: int) -> int:
    """The global step of a checkpoint folder: from its trainer_state.json, else its name, else its position."""
    from .runs import CHECKPOINT

    path = os.path.join(folder, "trainer_state.json")
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f).get("global_step", index + 1))
    match = CHECKPOINT.search(os.path.normpath(folder))
    return int(match.group(1)) if match else index + 1


if __name__ == "__main__":
    raise SystemExit(main())
