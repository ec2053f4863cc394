"""`edgeenc probe train | evaluate | attach`: your own classifier on the encoder's frozen embeddings (torch-free)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import typer

from edgeenc.cli_common import (
    EncoderChoice,
    ExitStatus,
    OverwriteOpt,
    fail,
    failing_on,
    grouped_options,
    note,
    require,
)
from edgeenc.runtime.windows import WindowOptions

probe_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Your own classifier: train a linear probe on a bundle's embeddings of your labelled "
                             "recordings, compare bundles on your data, and attach the probe into a bundle.")

LabelColumnOpt = typer.Option(None, "--label-column", help="Raven tables: the column holding the label (default: "
                                                          "Species, Annotation, Label or Class)")
NegativesOpt = typer.Option(None, "--negatives", help="a folder-per-label name that holds negatives (repeatable; "
                                                     "default: negative, negatives, background, noise, other)")
MinOverlapOpt = typer.Option(0.5, "--min-overlap", help="seconds a window must share with an annotation to take its "
                                                       "label (an annotation inside the window whole always counts)")
RangeOpt = typer.Option(600.0, "--range-seconds", help="a long recording is embedded and kept in ranges of about "
                                                      "this much audio (what a killed run can lose)")


def _labelled(data: Path, label_column: str | None, negatives: list[str] | None):
    from edgeenc.runtime.probes import NEGATIVE_NAMES, LabelledDataError, load_labelled

    if not data.exists():
        fail(f"{data}: no such folder or file of labelled recordings")
    with failing_on(LabelledDataError):
        return load_labelled(data, label_column=label_column, negatives=negatives or NEGATIVE_NAMES)


def _embedded(encoder, recordings, windows: WindowOptions, store: Path, overwrite: bool, range_seconds: float,
              failures: dict[str, str]):
    """{path: EmbeddingResult} of the recordings that could be embedded (resumable, parts in `store`.parts/);
    the others land in `failures` with the reason, printed as they come."""
    from edgeenc.cli_run import resumable_results
    from edgeenc.runtime.probes import check_spans

    for path, why in check_spans(recordings).items():
        failures[path] = why
        note(f"error: {path}: {why}")
    files = []
    for recording in recordings:
        if recording.path in failures:
            continue
        if not os.path.isfile(recording.path):
            failures[recording.path] = "no such file (named by the labelled data)"
            note(f"error: {recording.path}: no such file (named by the labelled data)")
            continue
        files.append(Path(recording.path))
    done, _, parts = resumable_results(encoder, files, windows, store, overwrite, range_seconds, failures)
    return {outcome.path: outcome.result for outcome in done}, parts


def _bundle_info(encoder) -> dict:
    from edgeenc.runtime.bundle import bundle_identity

    m = encoder.manifest
    return {"model_id": m.get("model_id"), "bundle_sha256": bundle_identity(encoder.bundle, m)[1],
            "checkpoint_sha256": m.get("checkpoint_sha256"), "random_init": bool(m.get("random_init")),
            "variant": encoder.backend.variant, "path": str(encoder.bundle)}


@probe_app.command("train")
@grouped_options
def train(
    bundle: Path = typer.Argument(..., help="a bundle folder: the probe is trained on its embeddings"),
    data: Path = typer.Argument(..., help="labelled recordings: a folder with a folder per label, a CSV of "
                                          "file,start,end,label rows, Raven selection tables, a review index.csv "
                                          "from `edgeenc clips`, or a search table from `edgeenc search -o`"),
    out: Path = typer.Option(..., "-o", "--out", help="the probe's folder (probe.json, report.md)"),
    label_column: str | None = LabelColumnOpt,
    negatives: list[str] | None = NegativesOpt,
    min_overlap: float = MinOverlapOpt,
    c: float = typer.Option(1.0, "--c", help="inverse regularisation strength of the logistic regression"),
    range_seconds: float = RangeOpt,
    overwrite: OverwriteOpt = False,
    windows: WindowOptions = WindowOptions(),
    choice: EncoderChoice = EncoderChoice(),
) -> None:
    """Train a linear probe (scikit-learn logistic regression) on a bundle's embeddings of labelled recordings,
    split by recording for its held-out figures; writes probe.json and report.md."""
    require("probe train", "sklearn", extra="probe")
    from edgeenc.runtime.probes import (
        PROBE_FILE,
        REPORT_FILE,
        LabelledDataError,
        ProbeSettings,
        fingerprint,
        headline,
        labelled_windows,
        train_probe,
    )

    if not min_overlap > 0 or not c > 0:
        fail("--min-overlap and --c must be positive numbers")
    if (out / PROBE_FILE).exists() and not overwrite:
        fail(f"{out / PROBE_FILE} exists: pass --overwrite to replace it, or -o another folder")
    if out.exists() and not out.is_dir():
        fail(f"{out}: not a folder: -o names the probe's folder")
    recordings = _labelled(data, label_column, negatives)
    encoder = choice.open(bundle)
    out.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    results, parts = _embedded(encoder, recordings, windows, out / "embeddings", overwrite, range_seconds, failures)
    cut = windows.with_window(encoder.window_seconds)
    settings = ProbeSettings(c=c, min_overlap=min_overlap)
    with failing_on(LabelledDataError):
        labelled = labelled_windows(recordings, results, min_overlap)
        used = [r for r in recordings if r.path in results]
        data_info = {"source": str(data), "fingerprint": fingerprint(used, min_overlap), "failed": failures,
                     "min_overlap": min_overlap}
        probe = train_probe(labelled, _bundle_info(encoder), settings, data_info=data_info,
                            window={"window_seconds": cut.window_seconds, "hop_seconds": cut.hop_seconds,
                                    "last": cut.last, "channel": cut.channel})
    probe.save(out)
    figures = ", ".join(f"{k} {v:.3f}" for k, v in headline(probe.metrics).items() if v is not None)
    note(f"probe of {len(probe.classes)} classes ({probe.activation}) on {labelled.embeddings.shape[0]} windows of "
         f"{len(labelled.files)} recordings; held out by recording: {figures}")
    note(f"wrote {out / PROBE_FILE} and {out / REPORT_FILE}; attach it with `edgeenc probe attach {bundle} {out} -o "
         "NEW_BUNDLE`")
    if failures:
        note(f"{len(failures)} recording(s) not used (listed in {out / REPORT_FILE}); their finished parts are kept "
             f"in {parts.folder}: fix them and run again with --overwrite to include them")
        raise typer.Exit(ExitStatus.SOME_FILES_FAILED)
    parts.remove()


@probe_app.command("evaluate")
@grouped_options
def evaluate(
    paths: list[Path] = typer.Argument(..., help="BUNDLE... DATA: one or more bundle folders, then the labelled "
                                                 "recordings (as for `probe train`)"),
    out: Path | None = typer.Option(None, "-o", "--out", help="a folder for evaluation.json, evaluation.csv and "
                                                              "the per-class AP chart (and resumable embeddings)"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON on stdout"),
    label_column: str | None = LabelColumnOpt,
    negatives: list[str] | None = NegativesOpt,
    min_overlap: float = MinOverlapOpt,
    range_seconds: float = RangeOpt,
    windows: WindowOptions = WindowOptions(),
    choice: EncoderChoice = EncoderChoice(),
) -> None:
    """The model cards' figures on your data for each bundle, side by side: linear-probe accuracy (or mAP) on
    held-out recordings, retrieval ROC AUC and clustering NMI."""
    require("probe evaluate", "sklearn", extra="probe")
    import tempfile

    from edgeenc.runtime.probes import (
        LabelledDataError,
        ProbeSettings,
        evaluate,
        headline,
        labelled_windows,
        plot_average_precision,
    )

    if len(paths) < 2:
        fail("give one or more bundles and then the labelled data: edgeenc probe evaluate BUNDLE... DATA")
    *bundles, data = paths
    if out is not None and out.exists() and not out.is_dir():
        fail(f"{out}: not a folder: -o names a folder for the evaluation")
    recordings = _labelled(data, label_column, negatives)
    settings = ProbeSettings(min_overlap=min_overlap)
    figures: dict[str, dict] = {}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="edgeenc-evaluate-") as scratch:
        store = out if out is not None else Path(scratch)
        store.mkdir(parents=True, exist_ok=True)
        for index, bundle in enumerate(bundles):
            encoder = choice.open(bundle)
            name = f"{index + 1}:{encoder.manifest.get('model_id')}"
            failures: dict[str, str] = {}
            results, parts = _embedded(encoder, recordings, windows, store / f"embeddings-{index + 1}", False,
                                       range_seconds, failures)
            failed = max(failed, len(failures))
            with failing_on(LabelledDataError):
                found = evaluate(labelled_windows(recordings, results, min_overlap), settings)
            figures[name] = {"bundle": str(bundle), "model_id": encoder.manifest.get("model_id"),
                             "recordings_failed": failures, **found}
            if not failures:
                parts.remove()
    _print_side_by_side(figures, headline)
    if as_json:
        typer.echo(json.dumps(figures, indent=1))
    if out is not None:
        from edgeenc.runtime.atomic import atomic_text, write_json_atomic

        write_json_atomic(out / "evaluation.json", figures)
        with atomic_text(out / "evaluation.csv") as fh:
            fh.write("bundle,model_id,metric,value\n")
            for name, found in figures.items():
                for metric, value in headline(found).items():
                    fh.write(f"{name},{found['model_id']},{metric},{'' if value is None else f'{value:.6f}'}\n")
        chart = out / "average_precision.png"
        if plot_average_precision(figures, chart):
            note(f"wrote {out / 'evaluation.json'}, {out / 'evaluation.csv'} and {chart}")
        else:
            note(f"wrote {out / 'evaluation.json'} and {out / 'evaluation.csv'} (no chart: pip install matplotlib)")
    if failed:
        raise typer.Exit(ExitStatus.SOME_FILES_FAILED)


def _print_side_by_side(figures: dict[str, dict], headline) -> None:
    names = list(figures)
    rows = {}
    for name in names:
        for metric, value in headline(figures[name]).items():
            rows.setdefault(metric, {})[name] = value
    width = max(24, *(len(n) + 2 for n in names))
    typer.echo(f"{'':26}" + "".join(f"{n:>{width}}" for n in names))
    for metric, values in rows.items():
        cells = "".join(f"{'-' if values.get(n) is None else f'{values[n]:.4f}':>{width}}" for n in names)
        typer.echo(f"{metric:26}{cells}")
    first = figures[names[0]]["split"]
    typer.echo(f"split: {first['description']} Held out: {', '.join(first['held_out_recordings'])}")


@probe_app.command("attach")
def attach(
    bundle: Path = typer.Argument(..., help="the bundle the probe was trained on"),
    probe_dir: Path = typer.Argument(..., help="the probe's folder (from `edgeenc probe train`)"),
    out: Path = typer.Option(..., "-o", "--out", help="the new bundle's folder"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a new bundle whose model.onnx also computes the probe's scores (outputs probe_logits, probe_scores),
    gated against scikit-learn; classify, watch, listen, Ray, the C++ program and TensorRT engines use it."""
    require("probe attach", "sklearn", "onnx", extra="probe")
    from edgeenc.runtime.bundle import BundleError
    from edgeenc.runtime.probes import AttachError, ProbeError, attach_probe

    if out.exists() and not overwrite:
        fail(f"{out} exists: pass --overwrite to replace it, or -o another folder")
    if out.resolve() == bundle.resolve():
        fail(f"-o {out} is the parent bundle itself: give a new folder (the parent stays as it is)")
    target = out.with_name(out.name + ".attaching") if out.exists() else out
    if target != out:
        shutil.rmtree(target, ignore_errors=True)  # a leftover of an attach killed before it finished
    with failing_on(AttachError, BundleError, ProbeError):
        result = attach_probe(bundle, probe_dir, target)
    if target != out:  # the old bundle is replaced only by a whole new one
        shutil.rmtree(out)
        os.replace(target, out)
    worst = max(c.max_abs for c in result.comparisons if c.output == "probe_scores")
    cases = len({c.case for c in result.comparisons})
    if not result.passed:
        bad = next(c for c in result.comparisons if not c.passed)
        fail(f"wrote {out} marked failed-parity: {bad.output} on {bad.case} differs by {bad.max_abs:.3g} (limit "
             f"{bad.max_abs_limit:.3g}) from {bad.reference}", ExitStatus.PARITY_FAILED)
    note(f"wrote {out}: probe scores within {worst:.2g} of scikit-learn on {cases} parity cases (limit 1e-05); "
         f"classify, watch and listen use the probe by default (--head model for the model's own head)")
