"""``elastic-ckpt ls | inspect | verify | export`` (``export --format hf``: a Hugging Face
model directory).

Exit status: 0 on success, 1 when the checkpoint or the storage is at fault (an
``ElasticCkptError``: not found, not committed, corrupt, unwritable output), 2 for usage
errors. Expected errors print one ``elastic-ckpt <command>: error: ...`` line to stderr, never
a traceback; with ``--json`` stdout also carries ``{"ok": false, "error": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

from elastic_ckpt.checkpoint.catalog import Catalog, open_checkpoint
from elastic_ckpt.checkpoint.export import EXPORT_FORMATS, ExportReport, export_checkpoint
from elastic_ckpt.checkpoint.export_hf import (
    DEFAULT_MAX_SHARD_SIZE,
    HF_DEFAULT_PREFIX,
    HF_FORMAT,
    HFExportReport,
    export_hf,
    parse_size,
)
from elastic_ckpt.checkpoint.manifest import COMMITTED_FILE, MANIFEST_FILE
from elastic_ckpt.checkpoint.verify import verify
from elastic_ckpt.cli import timeline, views
from elastic_ckpt.errors import (
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    ElasticCkptError,
)
from elastic_ckpt.storage import Storage

PROG = "elastic-ckpt"
_SUFFIX_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
_ALL_FORMATS = (*EXPORT_FORMATS, HF_FORMAT)


# -- commands: each takes the parsed args and returns (JSON-able result, text) ----------------
def cmd_ls(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    root = Storage(args.root)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{root.uri} is not a directory; pass the checkpoint "
                                      "root the training job writes to", path=root.uri)
    view = views.ls_view(root)
    if not view["checkpoints"] and (root.exists(COMMITTED_FILE) or root.exists(MANIFEST_FILE)):
        raise CheckpointNotFoundError(
            f"{root.uri} is a checkpoint, not a checkpoint root; use `{PROG} inspect "
            f"{args.root}`, or `{PROG} ls` on its parent directory", path=root.uri)
    return view, views.format_ls(view)


def cmd_inspect(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    directory, manifest = _explain_root(args.checkpoint,
                                        lambda: open_checkpoint(Storage(args.checkpoint)))
    view = views.inspect_view(directory.uri, manifest)
    return view, views.format_inspect(view)


def cmd_verify(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    started = time.perf_counter()
    report = _explain_root(args.checkpoint, lambda: verify(args.checkpoint))
    seconds = time.perf_counter() - started
    gb_per_s = report.bytes_checked / seconds / 1e9 if seconds > 0 else 0.0
    result = {"ok": True, "uri": report.uri, "step": report.step,
              "num_tensors": report.num_tensors, "num_chunks": report.num_chunks,
              "bytes_checked": report.bytes_checked, "seconds": round(seconds, 6),
              "gb_per_s": round(gb_per_s, 3)}
    text = (f"OK {report.uri}: step {report.step}, {report.num_tensors} tensors, "
            f"{report.num_chunks} chunks, {views.human_bytes(report.bytes_checked)} verified "
            f"in {seconds:.2f} s ({gb_per_s:.2f} GB/s)")
    return result, text


def cmd_export(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    started = time.perf_counter()
    report = _explain_root(args.checkpoint, lambda: _run_export(args))
    seconds = time.perf_counter() - started
    result = {"ok": True, "checkpoint": report.checkpoint_uri, "output": report.output_uri,
              "step": report.step, "format": report.format, "num_tensors": report.num_tensors,
              "total_bytes": report.total_bytes,
              "num_skipped_tensors": report.num_skipped_tensors,
              "num_objects_not_exported": report.num_objects, "seconds": round(seconds, 6)}
    what, left_out, notes = report.format, [], ()
    if isinstance(report, HFExportReport):
        result.update(files=list(report.files), tied_dropped=dict(report.tied_dropped),
                      config_written=report.config_written, notes=list(report.notes))
        what = f"{report.format}: {', '.join(report.files)}"
        left_out = [f"{name} not written (tied to {kept})"
                    for name, kept in report.tied_dropped.items()]
        notes = report.notes
    if report.num_skipped_tensors:
        left_out.append(f"{report.num_skipped_tensors} tensors outside prefix "
                        f"{args.prefix!r} skipped")
    if report.num_objects:
        left_out.append(f"{report.num_objects} non-tensor objects not exported")
    text = (f"exported {report.num_tensors} tensors ({views.human_bytes(report.total_bytes)}) "
            f"of step {report.step} to {report.output_uri} ({what}) in {seconds:.2f} s")
    text += f"; {'; '.join(left_out)}" if left_out else ""
    return result, "\n".join([text, *(f"note: {note}" for note in notes)])


def _run_export(args: argparse.Namespace) -> ExportReport:
    if args.format == HF_FORMAT:
        return export_hf(args.checkpoint, args.output, args.prefix,
                         max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                         overwrite=args.overwrite)
    return export_checkpoint(args.checkpoint, args.output, args.format, args.prefix,
                             overwrite=args.overwrite)


def _explain_root(uri: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; if ``uri`` turns out to be a checkpoint *root*, say so and name the
    checkpoints inside instead of reporting a missing COMMITTED marker."""
    try:
        return fn()
    except CheckpointNotCommittedError:
        root = Storage(uri)
        if root.exists(MANIFEST_FILE):
            raise
        committed, _ = Catalog(root).scan()
        if not committed:
            raise
        latest = Catalog(root).directory(committed[-1]).uri
        raise CheckpointNotFoundError(
            f"{root.uri} is a checkpoint root, not a checkpoint; pass one of the checkpoints "
            f"inside it, e.g. the latest: {latest} (all: `{PROG} ls {uri}`)",
            path=root.uri) from None


# -- argument parsing --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="List, inspect, verify and export elastic_ckpt checkpoints. Paths may be "
                    "local or any URI pyarrow.fs understands (s3://, gs://, hdfs://).",
        epilog="Exit status: 0 ok, 1 checkpoint/storage error (not found, not committed, "
               "corrupt), 2 usage error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", help="list the checkpoints under a root",
                       description="List committed checkpoints under ROOT, oldest first "
                                   "(step, world size, size, tensors, creation time), and mark "
                                   "UNCOMMITTED directories (debris of a crashed save, or a "
                                   "save still running), CORRUPT ones (quarantined by a load "
                                   "that fell back past them) and UNREADABLE manifests. Those "
                                   "are never loaded.")
    p.add_argument("root", metavar="ROOT", help="checkpoint root (holds step-NNNNNNNN dirs)")
    _add_json(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="show a checkpoint's manifest: tensors, shards, state",
                       description="Show step, world size, mesh, format and library versions, "
                                   "total bytes, and every tensor with its global shape, dtype, "
                                   "placements and which rank holds which part (rows [a, b) "
                                   "for dim-0 shards, a box of per-dim ranges otherwise), "
                                   "the number of non-tensor objects and the extra JSON. "
                                   "Reads only the manifest.")
    p.add_argument("checkpoint", metavar="CKPT", help="a committed checkpoint directory "
                                                      "(ROOT/step-NNNNNNNN)")
    _add_json(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="re-read every byte and check every checksum",
                       description="Read every chunk of CKPT and check every crc32c block "
                                   "and the manifest. Prints one OK line; exits 1 naming the "
                                   "file and tensor on the first corrupt, truncated or "
                                   "missing byte, or if CKPT is not a committed checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="a committed checkpoint directory")
    _add_json(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write a full, unsharded state dict for inference",
                       description="Assemble every selected tensor from its shards (verifying "
                                   "every byte read) and write one unsharded file, or with "
                                   "--format hf a Hugging Face model directory. Each tensor "
                                   "is held in memory once; safetensors output is streamed, so "
                                   "peak memory is the largest tensor. Only tensors are "
                                   "exported: non-tensor objects (optimizer hyper-parameters, "
                                   "extra state) are not.",
                       epilog="For an inference state dict of a model saved with AppState, "
                              "use --prefix app.model. (keys then match model.state_dict()). "
                              "--format hf writes OUT/model.safetensors (or numbered shards "
                              "and model.safetensors.index.json) with tied weights written "
                              "once, and OUT/config.json from the model record the trainer "
                              "saves, so from_pretrained(OUT) loads it.")
    p.add_argument("checkpoint", metavar="CKPT", help="a committed checkpoint directory")
    p.add_argument("output", metavar="OUT",
                   help="output file path or URI (a directory for --format hf)")
    p.add_argument("--format", choices=_ALL_FORMATS, default=None,
                   help="output format (default: from OUT's suffix: .safetensors -> "
                        "safetensors, .pt/.pth -> torch); hf: a Hugging Face model directory")
    p.add_argument("--prefix", default=None, metavar="PREFIX",
                   help="export only tensors whose key starts with PREFIX, with PREFIX "
                        "stripped; a trailing '.' is implied (default: '' = every tensor, "
                        f"keys as `inspect` shows them; {HF_DEFAULT_PREFIX} for hf)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE", type=_shard_size,
                   help="hf only: largest safetensors file, e.g. 500MB, 2GiB or a byte count; "
                        "more weights than that are split into numbered shards plus an index "
                        f"(default: {DEFAULT_MAX_SHARD_SIZE})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (hf: replace the model files in a "
                        "non-empty OUT, keeping other files)")
    _add_json(p)
    p.set_defaults(func=cmd_export, subparser=p)

    timeline.add_parser(sub)
    return parser


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout instead of text")


def _shard_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _resolve_export_args(args: argparse.Namespace) -> None:
    """Fill ``--format`` from OUT's suffix and ``--prefix`` from the format, or fail as a
    usage error."""
    if args.command != "export":
        return
    if args.format is None:
        args.format = next((fmt for suffix, fmt in _SUFFIX_FORMATS.items()
                            if args.output.lower().endswith(suffix)), None)
    if args.format is None:
        args.subparser.error(f"cannot tell the format from {args.output!r}; pass "
                             f"--format {{{','.join(_ALL_FORMATS)}}}")
    if args.max_shard_size is not None and args.format != HF_FORMAT:
        args.subparser.error(f"--max-shard-size applies to --format {HF_FORMAT} only "
                             f"(--format {args.format} writes one file)")
    if args.prefix is None:
        args.prefix = HF_DEFAULT_PREFIX if args.format == HF_FORMAT else ""


# -- entry point -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (never raises for expected errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _resolve_export_args(args)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        result, text = args.func(args)
        _emit(json.dumps(result, indent=2) if args.json else text)
        return 0
    except ElasticCkptError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        if args.json:
            _emit(json.dumps({"ok": False, "error": _error_json(exc)}, indent=2))
        return 1
    except BrokenPipeError:  # `elastic-ckpt inspect X | head`: the reader left; stay quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def _emit(text: str) -> None:
    print(text)
    sys.stdout.flush()


def _error_json(exc: ElasticCkptError) -> dict[str, Any]:
    details = {k: v for k, v in exc.details.items()
               if isinstance(v, (str, int, float, bool)) or v is None}
    return {"type": type(exc).__name__, "message": exc.message, **details}


if __name__ == "__main__":
    sys.exit(main())
