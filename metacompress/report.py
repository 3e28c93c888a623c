"""``report.json`` of a compress run: what was asked, what was measured (DESIGN.md's contract)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from metacompress.budget import LATENCY_TOL
from metacompress.compress.measure import count_macs, count_params

if TYPE_CHECKING:
    from metacompress.pipeline import CompressConfig, Compressed


def _ms(lat: dict, name: str, batches: list[str]) -> dict[str, float]:
    return {b: lat[name][b]["median_ms"] for b in batches}


def compress_report(cfg: "CompressConfig", c: "Compressed", r: dict[str, Any]) -> dict[str, Any]:
    """The report of one run from the compressed model ``c`` and the export/verify results ``r``."""
    prep, student = c.prep, c.student
    spec = cfg.budget()
    lat, ver, exp = r["latency"], r["verify"], r["export"]
    batches = list(lat["dense"])
    macs = count_macs(student, prep.data.x_test[:1])
    off = set(prep.space.off_grid(c.keep))
    report: dict[str, Any] = {
        "model": cfg.model, "data": cfg.data, "out": str(cfg.out), "policy": cfg.allocation,
        "target_macs": spec.value if spec.metric == "macs" else None,
        "target_params": spec.value if spec.metric == "params" else None,
        "target_latency": spec.value if spec.metric == "latency" else None,
        "target_ms": spec.value if spec.metric == "ms" else None,
        "speedup": {b: round(lat["dense"][b]["median_ms"] / lat["compressed"][b]["median_ms"], 3) for b in batches},
        "achieved_macs_ratio": round(macs / prep.space.dense_macs, 4),
        "achieved_params_ratio": round(count_params(student) / prep.space.dense_params, 4),
        "round_to": prep.space.round_to,
        "dense": {"macs": prep.space.dense_macs, "params": prep.space.dense_params, "accuracy": prep.dense_accuracy,
                  "latency_ms": _ms(lat, "dense", batches), "onnx_bytes": r["dense_export"]["bytes"]},
        "compressed": {"macs": macs, "params": count_params(student), "accuracy": ver["accuracy"],
                       "accuracy_before_repair": c.pruned_accuracy[0],
                       "accuracy_before_repair_samples": c.pruned_accuracy[1], "latency_ms": _ms(lat, "compressed", batches),
                       "onnx_bytes": exp["bytes"]},
        "onnx": {"max_abs_diff": ver["max_abs_diff"], "max_rel_diff": ver["max_rel_diff"],
                 "parity_samples": ver["parity_samples"], "top1_agreement": ver["top1_agreement"], "opset": exp["opset"],
                 "exporter": exp["exporter"], "dense_max_abs_diff": r["dense_verify"]["max_abs_diff"]},
        "test_samples": ver["samples"],
        "groups": [{"name": g.name, "kind": g.kind, "channels": g.channels, "kept": k, "on_grid": g.name not in off}
                   for g, k in zip(prep.space.groups, c.keep)],
        "repair": c.repair.to_dict(),
        "seed": cfg.seed,
        "determinism": determinism_section(prep.budget.latency is not None),
    }
    warnings = list(c.warnings)
    if prep.budget.latency is not None:
        report["latency"] = latency_section(cfg, c, lat)
        warnings = final_latency_warnings(warnings, report["latency"], cfg.latency_batch,
                                          prep.budget.latency.miss(c.keep))
    warnings += not_faster_warnings(report["speedup"], cfg.latency_batch if spec.is_latency else None)
    if warnings:
        report["warnings"] = warnings
    if c.guard is not None:
        report["guard"] = c.guard
    if prep.robust is not None:
        report["robustify"] = prep.robust
    if c.rescue is not None:
        report["repair_rescue"] = c.rescue
    if c.soup is not None:
        report["students"] = [{k: v for k, v in st.items() if k not in ("state_dict", "val_correct")}
                              for st in c.students]
        report["soup"] = c.soup | {"test_accuracy": ver["accuracy"]}
    if "quant" in r:
        q = r["quant"]
        report["int8"] = {"mode": q["mode"], "onnx_bytes": q["bytes"], "size_ratio": round(q["size_ratio"], 4),
                          "accuracy": q["accuracy"], "top1_agreement": q["top1_agreement"],
                          "latency_ms": _ms(lat, "int8", batches)}
    return report


def final_latency_warnings(warnings: list[str], section: dict[str, Any], batch: int,
                           loop_miss: str | None) -> list[str]:
    """``warnings`` as the final timing of the exported model leaves them. Within the tolerance,
    the correction loop's miss for this allocation (``loop_miss``) is dropped: the final timing,
    longer and of the deployed file, supersedes it. Off the tolerance, where nothing was warned
    (the loop met the target), the final timing's miss is said."""
    if section["within_tolerance"]:
        return [w for w in warnings if w != loop_miss]
    if warnings:
        return warnings
    final, target = section["measured_fraction"][f"b{batch}"], section["target_fraction"]
    way = "faster" if final < target else "slower"
    return [f"the exported model measures {final:.3f} of the dense latency at batch {batch}, "
            f"{abs(final / target - 1):.1%} {way} than the target {target:.3f} that the correction loop met within "
            f"{section['tolerance']:.0%}: timings on this machine vary that much between sessions "
            f"(`metacompress bench` re-times it)"]


def not_faster_warnings(speedup: dict[str, float], budget_batch: int | None) -> list[str]:
    """A warning for each batch size at which the compressed model runs no faster than the dense
    one: what a user compresses for, and what a MACs budget or a latency budget set at another
    batch size does not promise."""
    hint = ("MACs are not time on this runtime; --target-latency budgets the measured time" if budget_batch is None
            else f"the latency budget holds at batch {budget_batch}; --latency-batch sets the batch it holds at")
    return [f"the compressed model is not faster than the dense model at batch {b[1:]} ({s:.2f}x): {hint}"
            for b, s in speedup.items() if s < 1.0]


def determinism_section(latency_budget: bool) -> dict[str, Any]:
    """What the seed does and does not pin down (RELIABILITY.md has the runs behind each note)."""
    threads = torch.get_num_threads()
    notes = [
        "the same command and seed give the same report (timings and latencies aside) and the same model.onnx "
        "and model.pt bytes at the same torch thread count",
        f"torch used {threads} thread(s) (OMP_NUM_THREADS sets it): at another count, convolutions sum in another "
        "order, so weights can differ in the last bits and model.onnx bytes with them (accuracy the same in our runs)",
    ]
    if latency_budget:
        notes.append("a latency budget allocates from timed measurements (the latency model when it is built, and "
                     "the measured correction rounds), so kept widths can differ between runs on a busy machine")
    return {"torch_threads": threads, "notes": notes}


def latency_section(cfg: "CompressConfig", c: "Compressed", lat: dict) -> dict[str, Any]:
    """The latency budget: asked, predicted by the latency model, measured on the final model."""
    budget = c.prep.budget
    model, target = budget.latency.model, budget.latency
    measured = {b: round(lat["compressed"][b]["median_ms"] / lat["dense"][b]["median_ms"], 4) for b in lat["dense"]}
    return {
        "batch": cfg.latency_batch, "threads": target.threads, "provider": target.provider,
        "target_fraction": round(budget.target, 4),
        "predicted_fraction": {f"b{b}": round(model.predict_fraction(c.keep, b), 4) for b in sorted(model.fits)},
        "predicted_ms": {f"b{b}": round(model.predict_ms(c.keep, b), 4) for b in sorted(model.fits)},
        "measured_fraction": measured,
        "measured_ms": _ms(lat, "compressed", list(lat["dense"])),
        "within_tolerance": abs(measured[f"b{cfg.latency_batch}"] / budget.target - 1) <= LATENCY_TOL,
        "tolerance": LATENCY_TOL,
        "correction_rounds": target.report(),
        "model": {k: v for k, v in model.describe().items() if k != "signature"} | {"runtime": model.signature},
    }
