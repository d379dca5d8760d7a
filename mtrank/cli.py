"""The ``mtrank`` command: train, evaluate, report, export, refresh, calibrate, bundle verify/sign/keygen, serve, stack, demo.

Torch is imported only by the subcommands that train or export, so ``mtrank serve`` and
``mtrank bundle ...`` run on a serving install (onnxruntime + fastapi + cryptography, no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mtrank.config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML-parsed), e.g. --set model.arch=ple; repeatable")
    p.add_argument("--data-dir", help="sets $MTRANK_DATA_DIR, which example configs read their data from")


def cmd_train(args: argparse.Namespace) -> int:
    from mtrank.config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before any process starts
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from model.distributed import gpu_count
        from model.train import use_cuda

        use_cuda(cfg.train.device, gpu_count(), args.nproc)
        return _torchrun(args.nproc, ["train", args.config, "--out", args.out,
                                      *(a for o in args.overrides for a in ("--set", o))])
    from model.evaluate import format_table
    from model.train import train

    metrics = train(cfg, args.out)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(format_table(metrics))
    t = metrics["train"]
    print(f"\nrun: {args.out}  best epoch {t['best_epoch']}  {t['rows_per_s']:.0f} rows/s  params {t['params']}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """``torchrun --standalone --nproc-per-node N -m mtrank ARGV``: N training processes on this machine; a rank
    that fails stops the others, and the exit status is non-zero."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mtrank", *argv]
    return subprocess.call(cmd)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model.data import encode_split, load_frames
    from model.evaluate import evaluate_split, format_table, to_tensors
    from model.train import load_run

    cfg, schema, model = load_run(args.run_dir)
    result: dict = {"gates": {}}
    if cfg.data.stream is None:
        _, val_df, test_df = load_frames(cfg)
    else:  # streamed train data is never read here; validation in memory, test streamed
        from model.data import needed_columns, read_files
        from model.stream import evaluate_streamed

        val_df, test_df = read_files(cfg.data, cfg.data.validation, needed_columns(cfg)), None
        if cfg.data.test:
            result["test"], result["gates"]["test"] = evaluate_streamed(cfg, schema, model)
    for name, df in (("validation", val_df), ("test", test_df)):
        if df is not None and len(df):
            split = encode_split(cfg, schema, df)
            result[name], result["gates"][name] = evaluate_split(cfg, model, split, to_tensors(split))
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mtrank.bundle import check_version_name

    if args.version is not None:
        check_version_name(args.version, "--version")  # before torch is imported or anything is read
    if args.sign is not None:
        from mtrank.signing import SignatureError, load_private_key

        try:
            load_private_key(args.sign)
        except SignatureError as err:
            raise SignatureError(f"--sign: {err}") from None
    from model.export import export_run, export_summary

    bundle = export_run(args.run_dir, args.out, version=args.version, activate=not args.no_activate,
                        quantize=args.quantize, max_auc_drop=args.max_auc_drop, sign_key=args.sign)
    print(json.dumps(export_summary(bundle), indent=1))
    return 0


CALIBRATE_NOTHING_WRITTEN = 3  # `mtrank calibrate`: no task's calibration improved on the holdout


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Exit 0: a new version written (JSON summary on stdout); 2: bad input; 3: no task improved, nothing
    written (the summary, with each task's reason, on stdout)."""
    from mtrank.bundle import check_version_name
    from mtrank.feedback_log import FeedbackLogError

    if not 0.0 < args.holdout_fraction < 1.0:
        raise ConfigError(f"--holdout-fraction: must be between 0 and 1 (exclusive), got {args.holdout_fraction}")
    if not 0.0 <= args.confidence < 1.0:
        raise ConfigError(f"--confidence: must be in [0, 1), got {args.confidence}")
    if args.min_labels < 1:
        raise ConfigError(f"--min-labels: must be at least 1, got {args.min_labels}")
    if args.version is not None:
        check_version_name(args.version, "--version")
    if args.sign is not None:
        from mtrank.signing import SignatureError, load_private_key

        try:
            load_private_key(args.sign)
        except SignatureError as err:
            raise SignatureError(f"--sign: {err}") from None
    from model.recalibrate import NoImprovement, recalibrate

    try:
        summary = recalibrate(args.bundle_dir, args.feedback, bundles_dir=args.bundles,
                              holdout_fraction=args.holdout_fraction, min_labels=args.min_labels,
                              confidence=args.confidence, version=args.version, activate=not args.no_activate,
                              sign_key=args.sign, stream=args.stream)
    except FeedbackLogError as err:
        raise ConfigError(f"--feedback: {err}") from None
    except NoImprovement as err:
        print(json.dumps(err.summary, indent=1))
        print(f"mtrank calibrate: nothing written: {err}", file=sys.stderr)
        return CALIBRATE_NOTHING_WRITTEN
    print(json.dumps(summary, indent=1))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mtrank.bundle import verify_bundle
    from mtrank.signing import Trust, read_signature

    trust = Trust.from_files(args.public_keys, require=True) if args.public_keys else None
    manifest, _ = verify_bundle(args.bundle_dir, trust=trust)
    doc = read_signature(args.bundle_dir)
    if doc is None:
        signature = "unsigned"
    elif trust is not None:
        signature = f"signature by key {doc['key_id']} verified"
    else:
        signature = f"signed by key {doc['key_id']} (not checked: no --public-key)"
    print(f"ok: {args.bundle_dir} version {manifest.model_version} ({manifest.arch}, tasks "
          f"{', '.join(manifest.scored_names)}); {signature}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from mtrank.bundle import verify_bundle
    from mtrank.signing import Signer, sign_bundle

    signer = Signer.from_file(args.key)
    verify_bundle(args.bundle_dir)  # sign only a bundle that passes every check
    path = sign_bundle(args.bundle_dir, signer)
    print(f"signed: {path} (key {signer.key_id})")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from mtrank.signing import generate_keypair

    private, public, kid = generate_keypair(args.out)
    print(json.dumps({"private_key": str(private), "public_key": str(public), "key_id": kid}, indent=1))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.main import serve

    serve(args.bundles, host=args.host, port=args.port, config_path=args.config, workers=args.workers)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from service.stack import StackConfig, main

    snapshot = Path(args.snapshot) if args.snapshot else None
    demo_rows = Path(args.bundles).parent / "demo.parquet"  # `mtrank demo` wrote bundles next to its data
    if snapshot is None and demo_rows.exists():
        snapshot = demo_rows
    return main(StackConfig(bundles=Path(args.bundles), replicas=args.replicas, workers=args.workers,
                            feature_store=args.feature_store, snapshot=snapshot,
                            prometheus=not args.no_prometheus, port=args.port, prometheus_port=args.prometheus_port,
                            config=Path(args.config) if args.config else None))


def cmd_demo(args: argparse.Namespace) -> int:
    from model.evaluate import format_table
    from model.export import export_run
    from model.synthetic import DEMO_CONFIG, write
    from model.train import train
    from mtrank.config import apply_overrides, parse_config

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "demo.parquet"
    if not data.exists():
        print(f"generating {args.rows} synthetic feed interactions -> {data}", file=sys.stderr)
        write(data, args.rows, seed=0)
    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["data"]["train"] = [str(data)]
    cfg = parse_config(apply_overrides(raw, args.overrides), base_dir=work)
    metrics = train(cfg, work / "run")
    print(format_table(metrics))
    bundle = export_run(work / "run", work / "bundles")
    print(f"bundle: {bundle}")
    if args.no_serve:
        return 0
    from service.main import serve

    service_cfg = work / "service.yaml"
    if not service_cfg.exists():  # the embedded feature store serves the synthetic users and items
        service_cfg.write_text(DEMO_SERVICE_CONFIG.format(snapshot=data))
    print(f"serving on http://{args.host}:{args.port}  (POST /rank, GET /docs; config {service_cfg})", file=sys.stderr)
    serve(work / "bundles", host=args.host, port=args.port, config_path=service_cfg)
    return 0


DEMO_SERVICE_CONFIG = """\
# mtrank demo service config (written by `mtrank demo`; edit and re-run to change it)
feature_store:
  backend: embedded
  snapshot: {snapshot}          # user and item rows of the synthetic feed (last row per id wins)
fusion:
  default: default              # weighted sum of the calibrated binary tasks
  profiles:
    engagement: {{type: expression, expression: "ctr + 0.5 * like + 2 * ctcvr"}}
    purchase: {{type: weighted_product, weights: {{ctr: 1.0, cvr: 2.0}}}}
"""


def cmd_report(args: argparse.Namespace) -> int:
    from model.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from model.refresh import load_refresh_config, parse_every, run_refresh

    every = parse_every(args.every) if args.every else None  # validated before anything is read
    rc = load_refresh_config(args.config)
    return run_refresh(rc, every_s=every, cycles=args.cycles)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtrank", description="Multi-task ranking: train, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a multi-task model from a YAML config")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--nproc", type=int, default=1, help="training processes on this machine (torchrun, DDP; "
                                                         "gloo on CPU, nccl on GPUs); default 1")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate a run on its validation and test splits")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="plots and a markdown summary of a run's training dynamics")
    p.add_argument("run_dir")
    p.add_argument("--out", help="directory for the report (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a run as a versioned bundle (ONNX + manifest)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="bundles directory (versions + CURRENT pointer)")
    p.add_argument("--version", help="bundle version name: 1-200 of [A-Za-z0-9._-], starting with a letter or "
                                     "digit (default: timestamp + model hash)")
    p.add_argument("--no-activate", action="store_true", help="do not point CURRENT at the new version")
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--max-auc-drop", type=float, default=0.002, help="int8: refuse when any task's AUC drops more")
    p.add_argument("--sign", metavar="KEY_FILE", help="sign the bundle with this Ed25519 private key (PEM)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("refresh", help="warm-start the active bundle's model on a new data window; promote it "
                                       "only through the gate (docs/refresh.md)")
    p.add_argument("config", help="refresh YAML (bundles, runs, window, train, gate, export)")
    p.add_argument("--every", metavar="DURATION", help="repeat every DURATION (90s, 30m, 6h, 1d); a failed cycle is "
                                                       "logged and retried at the next tick")
    p.add_argument("--cycles", type=int, help="with --every: stop after this many cycles")
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("calibrate", help="refit a bundle's calibration on the service's feedback log and write it "
                                         "as a new version (same model.onnx) when holdout ECE improves")
    p.add_argument("bundle_dir")
    p.add_argument("--feedback", required=True, metavar="LOG",
                   help="feedback log: a directory or file of JSON lines, or a redis:// URL (see --stream)")
    p.add_argument("--stream", default="mtrank:feedback", help="redis: the stream key (default mtrank:feedback)")
    p.add_argument("--bundles", help="bundles directory to write to (default: BUNDLE_DIR's parent)")
    p.add_argument("--holdout-fraction", type=float, default=0.3, help="share of requests held out (default 0.3)")
    p.add_argument("--min-labels", type=int, default=500, help="labels needed on each side, per task (default 500)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="share of bootstrap resamples of the holdout the refit must win (default 0.95; 0: any "
                        "lower ECE)")
    p.add_argument("--version", help="new version name (default: UTC time + 8 hex)")
    p.add_argument("--no-activate", action="store_true", help="do not point CURRENT at the new version")
    p.add_argument("--sign", metavar="KEY_FILE", help="sign the bundle with this Ed25519 private key (PEM)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bundle", help="bundle tools")
    bsub = p.add_subparsers(dest="bundle_command", required=True)
    v = bsub.add_parser("verify", help="check a bundle's signature, checksums, schema, golden and reference outputs")
    v.add_argument("bundle_dir")
    v.add_argument("--public-key", dest="public_keys", action="append", default=[], metavar="PUB",
                   help="trusted Ed25519 public key (PEM); repeatable. Given: the bundle must be signed by one")
    v.set_defaults(func=cmd_verify)
    v = bsub.add_parser("sign", help="sign a verified bundle's manifest (writes BUNDLE_DIR/signature.json)")
    v.add_argument("bundle_dir")
    v.add_argument("--key", required=True, metavar="KEY_FILE", help="Ed25519 private key (PEM, PKCS#8)")
    v.set_defaults(func=cmd_sign)
    v = bsub.add_parser("keygen", help="new Ed25519 key pair: PREFIX.key (private, 0600) and PREFIX.pub")
    v.add_argument("--out", required=True, metavar="PREFIX")
    v.set_defaults(func=cmd_keygen)

    p = sub.add_parser("serve", help="serve bundles over HTTP (POST /rank)")
    p.add_argument("--bundles", required=True, help="bundles directory")
    p.add_argument("--host", help="default: config file / $MTRANK_HOST / 127.0.0.1")
    p.add_argument("--port", type=int, help="default: config file / $MTRANK_PORT / 8000")
    p.add_argument("--workers", help="uvicorn worker processes (prometheus multiprocess mode when > 1), "
                   "or auto: one per available core (the default, with onnx.intra_op_threads shared out to match)")
    p.add_argument("--config", help="service YAML config (also $MTRANK_CONFIG)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stack", help="redis + N service replicas + prometheus on loopback (compose without Docker)")
    p.add_argument("--bundles", default="demo-run/bundles", help="bundles directory shared by the replicas")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers per replica")
    p.add_argument("--feature-store", choices=["redis", "embedded"], default="redis")
    p.add_argument("--snapshot", help="user + item rows (Parquet/CSV): pushed to Redis, or the embedded store "
                                      "(default: demo.parquet beside the bundles directory, as `mtrank demo` writes)")
    p.add_argument("--port", type=int, default=8000, help="first replica's port; the others follow (0: free ports)")
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--no-prometheus", action="store_true")
    p.add_argument("--config", help="service YAML merged under the stack's settings")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("demo", help="synthetic data -> train -> export -> serve, all with embedded defaults")
    p.add_argument("--workdir", default="demo-run")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--no-serve", action="store_true", help="stop after export")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "data_dir", None):
        os.environ["MTRANK_DATA_DIR"] = str(Path(args.data_dir).resolve())
    from mtrank.bundle import BundleError

    try:
        return args.func(args)
    except (ConfigError, BundleError, FileNotFoundError) as err:
        print(f"mtrank {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
