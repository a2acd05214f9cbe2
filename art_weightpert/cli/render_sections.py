"""
The report's sections beyond the accuracy table, as markdown lines: the generalization bound term by term, the
generalization measures, the bit flips, and what could not be computed (each reason once, with everything it
affects). Every section says what its numbers mean and in which units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from art_weightpert.metrics.plots import method_label

SECTION_LABELS = {
    "bit_flips": "bit flips",
    "generalization_bound": "generalization bound",
    "sharpness_worst": "worst-case sharpness",
    "sharpness_average": "average-case sharpness",
    "pac_bayes": "PAC-Bayes σ and bound",
    "pac_bayes_magnitude_aware": "magnitude-aware PAC-Bayes σ′ and bound",
}
THREAT_TITLES = {
    "float": "Float weights",
    "backdoor": "Backdoor by flips",
    "integrity": "Weight-integrity detector",
    "clipping": "Activation clipping",
}


def fmt(value: Any, spec: str = ".3f") -> str:
    """A number for a table (``n/a`` for missing or non-finite values)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def unavailable_by_reason(entry: Mapping[str, Any]) -> dict[str, list[str]]:
    """Everything of a model's entry that could not be computed, grouped by reason: ``{reason: [labels]}`` (each
    reason once, listing the methods and sections it affects)."""
    found: list[tuple[str, str]] = [(method_label(m), r) for m, r in (entry.get("unavailable") or {}).items()]
    for key in ("bit_flips", "generalization_bound"):
        section = entry.get(key)
        if isinstance(section, Mapping) and "unavailable" in section:
            found.append((SECTION_LABELS[key], section["unavailable"]))
    measures = entry.get("measures") or {}
    if "unavailable" in measures:
        found.append(("generalization measures", measures["unavailable"]))
    for key in ("sharpness_worst", "sharpness_average", "pac_bayes", "pac_bayes_magnitude_aware"):
        if isinstance(measures.get(key), Mapping) and "unavailable" in measures[key]:
            found.append((SECTION_LABELS[key], measures[key]["unavailable"]))
    groups: dict[str, list[str]] = {}
    for label, reason in found:
        groups.setdefault(reason, []).append(label)
    return groups


def unavailable_lines(entry: Mapping[str, Any]) -> list[str]:
    """One line per reason: ``"<labels> unavailable: <reason>"`` (the text of the log, the summary and the report)."""
    return [f"{', '.join(labels)} unavailable: {reason}" for reason, labels in unavailable_by_reason(entry).items()]


def bound_lines(bound: Mapping[str, Any]) -> list[str]:
    """The generalization bound of docs/theory.md §6 term by term, per layer, rounded, with its verdict."""
    if "unavailable" in bound:
        return []
    total, certified = bound["total"], bound["total_certified"]
    lines = [
        "",
        "### Generalization bound",
        "",
        f"The margin bound of docs/theory.md §6 on the test error, with probability ≥ {1 - bound['delta']:.2f} over "
        f"the {bound['n_samples']} training points, for every network of the class (ℓ∞ operator norms M_k of the "
        f"trained model, each perturbed within the row-ℓ1 radius ε_k of the report's largest ε = "
        f"{bound['budget_eps']:.4g}). "
        "Errors are shares of points (0 to 1); a bound above 1 says nothing (vacuous), as norm-product bounds "
        "usually are.",
        "",
        markdown_table(
            ["layer", "M_k (ℓ∞ operator norm)", "ε_k (row-ℓ1 radius)"],
            [
                [_layer(bound, k), f"{m:.4g}", f"{e:.4g}"]
                for k, (m, e) in enumerate(zip(bound["operator_norms"], bound["eps"]))
            ],
        ),
        "",
        f"* empirical margin loss (training points with margin ≤ γ = {bound['margin']:g}): "
        f"{bound['empirical_margin_loss']:.4f}; certified margin loss (same, with the certified margin at the "
        f"budget, {bound['method']} bound): {bound['certified_margin_loss']:.4f}",
        f"* Rademacher term: 4K/γ = {bound['margin_factor']:.4g} (K = {bound['nb_classes']} classes) × R = "
        f"{bound['rademacher_complexity']:.4g} (2^(d−1) Π_k (M_k + ε_k) · B · sqrt(2 ln(2n₀)/n), d = "
        f"{bound['depth']} layers, B = max ‖x‖∞ = {bound['input_bound']:.4g}, n₀ = {bound['input_dim']} inputs) = "
        f"{bound['rademacher_term']:.4g}",
        f"* confidence term sqrt(ln(1/δ)/(2n)): {bound['confidence_term']:.4f}",
        f"* **total** (the model): {verdict(total)}; for every network in the ball: {verdict(certified)}",
    ]
    return lines


def _layer(bound: Mapping[str, Any], k: int) -> str:
    """The k-th affine layer's number and module name (``"2 (`fc1`)"``)."""
    names = bound.get("layers") or []
    return f"{k + 1} (`{names[k]}`)" if k < len(names) and names[k] else str(k + 1)


def verdict(bound: float | None) -> str:
    """A bound on an error rate, rounded, and called vacuous when it exceeds 1."""
    if bound is None or not math.isfinite(bound):
        return "n/a"
    return f"{bound:.3g} — vacuous (> 1)" if bound > 1 else f"{bound:.3f}"


def measures_lines(measures: Mapping[str, Any]) -> list[str]:
    """The generalization measures of a model (sharpness, PAC-Bayes) and the generalization gap."""
    if "unavailable" in measures:
        return []
    s = measures["settings"]
    where = "training set" if measures["on"] == "training" else "test data (the .npz has no x_train)"
    lines = [
        "",
        "### Generalization measures",
        "",
        f"Computed on the {where} ({measures['n_samples']} points; docs/generalization.md). Losses are mean "
        "cross-entropies in nats, errors shares of points (0 to 1). Larger sharpness and smaller σ mean a sharper "
        "minimum, which tends to go with a larger generalization gap.",
        "",
    ]
    rows = []
    worst, average = measures.get("sharpness_worst", {}), measures.get("sharpness_average", {})
    if "loss_increase" in worst:
        rows.append(
            [
                f"worst-case adaptive sharpness (ℓ∞ ball \\|δ\\| ≤ {s['rho_worst']:g}·\\|w\\|, {s['pgd_steps']} "
                "WeightPGD steps)",
                f"loss +{worst['loss_increase']:.4f}, error +{worst['error_increase']:.4f}",
            ]
        )
    if "loss_increase" in average:
        rows.append([f"average-case adaptive sharpness (Gaussian δ ~ N(0, ({s['rho_average']:g}·w)²), "
                     f"{s['nb_draws']} draws)", f"loss +{average['loss_increase']:.4f}, error "
                     f"+{average['error_increase']:.4f}"])  # fmt: skip
    for key, what in (("pac_bayes", "σ (Gaussian N(0, σ²) on every weight)"),
                      ("pac_bayes_magnitude_aware", "σ′ (magnitude-aware N(0, σ′²w² + 10⁻⁶))")):  # fmt: skip
        pb = measures.get(key, {})
        if "sigma" in pb:
            rows.append([f"PAC-Bayes {what}: noise that lowers the accuracy by {s['target_deviation']:g}",
                         f"{pb['sigma']:.4g}"])  # fmt: skip
            rows.append([f"PAC-Bayes bound with that {what.split()[0]} (prior centred at 0, δ = {pb['delta']:g})",
                         f"{verdict(pb['bound'])} (noisy training error {pb['expected_error']:.4f} + complexity "
                         f"{pb['complexity_term']:.4g}, KL {pb['kl']:.4g})"])  # fmt: skip
    lines.append(markdown_table(["measure", "value"], rows))
    gap = measures.get("gap")
    if gap:
        lines += ["", f"Generalization gap (test − training): error {gap['error_gap']:+.4f} (test "
                  f"{gap['test_error']:.4f}, training {gap['train_error']:.4f}); cross-entropy "
                  f"{gap['loss_gap']:+.4f} nats (test {gap['test_loss']:.4f}, training "
                  f"{gap['train_loss']:.4f})."]  # fmt: skip
    return lines


def bit_flip_lines(flips: Mapping[str, Any], max_rows: int = 20) -> list[str]:
    """The bit-flip section of a model: accuracies against flips, the flips BFA chose, per-bit sensitivity."""
    if "unavailable" in flips:
        return []
    n = flips["n_bits"]
    halve = flips["flips_to_halve"]
    lines = [
        "",
        "### Bit flips",
        "",
        f"The weights quantized to {n}-bit two's complement integers ({flips['granularity']} scales; "
        f"docs/bit_flips.md). Accuracy of the float model {flips['clean_accuracy']:.3f}, of the quantized model "
        f"**{flips['quantized_accuracy']:.3f}**. Test accuracy after k flipped bits: chosen by the bit-flip attack "
        f"(BFA, on an attack batch of {flips['attack_points']} points), or drawn at random (mean ± standard deviation "
        "over the draws). Each flip is one fault injection: the more flips an accuracy drop needs, the more robust."
        + certified_intro(flips),
        "",
        flip_table(flips),
        *certified_flips_lines(flips),
        "",
        "Flips BFA needs to halve the accuracy (on its attack batch, to half the quantized test accuracy): "
        + (f"**{halve}**." if halve is not None else f"**more than {max(flips['flips'])}** (not reached)."),
        "",
        f"The flips BFA chose, in order (bit 0 is the least significant, bit {n - 1} the sign; weight values in the "
        "model's units):",
        "",
    ]
    rows = [[str(i + 1), f["layer"] or f["param"], str(tuple(f["index"])), str(f["bit"]),
             f"{f['old_code']} → {f['new_code']}", f"{f['old_value']:.4g} → {f['new_value']:.4g}"]
            for i, f in enumerate(flips["bfa_flips"][:max_rows])]  # fmt: skip
    lines.append(markdown_table(["#", "layer", "index", "bit", "code", "weight"], rows))
    if len(flips["bfa_flips"]) > max_rows:
        lines.append(f"\n({len(flips['bfa_flips']) - max_rows} more in report.json.)")
    sensitivity = flips["bit_sensitivity"]
    lines += [
        "",
        f"Per-bit sensitivity: test accuracy when {max(flips['flips'])} random flips all hit one bit position "
        "(low bits are harmless, the sign and top bits are not):",
        "",
        markdown_table(
            ["bit"] + [str(b) for b in sensitivity], [["accuracy"] + [f"{v:.3f}" for v in sensitivity.values()]]
        ),
    ]
    return lines + bit_flip_threat_lines(flips)


def bit_flip_threat_lines(flips: Mapping[str, Any]) -> list[str]:
    """The float model's bits, the backdoor by flips and what the post-hoc defences buy (each row only when it was
    computed; the reason when the library refused the model)."""
    lines: list[str] = []
    for key, render in (("float", _float_lines), ("backdoor", _backdoor_lines), ("integrity", _integrity_lines),
                        ("clipping", _clipping_lines)):  # fmt: skip
        row = flips.get(key)
        if not row:
            continue
        lines.append("")
        if "unavailable" in row:
            lines.append(f"{THREAT_TITLES[key]}: not computed ({row['unavailable']}).")
        else:
            lines += render(row)
    if lines:
        lines += ["", "What training buys is not measured here (it needs a new model): on the digits models, "
                  "`BitFlipRobustTrainer` (binarization-aware) makes BFA need 4–10× the flips at the same clean "
                  "accuracy; train one and evaluate both to compare (docs/bit_flips.md)."]  # fmt: skip
    return lines


def _float_lines(row: Mapping[str, Any]) -> list[str]:
    rows = [[str(k), f"{a:.3f}", f"{p:.3f}", f"{m:.3f} ± {s:.3f}"]
            for k, a, p, m, s in zip(row["flips"], row["attack_accuracy"], row["protected_attack_accuracy"],
                                     row["random_mean"], row["random_std"])]  # fmt: skip
    return [
        f"**Float weights.** The unquantized model ({row['dtype']}, accuracy {row['clean_accuracy']:.3f}) after k "
        "flipped IEEE bits of its weights: chosen by the float bit-flip attack over every bit, the same attack with "
        "the exponent protected (sign and mantissa bits only, as behind ECC or a range check), and at random "
        "(docs/bit_flips.md). One exponent flip can turn a weight into 10^38 or NaN.",
        "",
        markdown_table(["flips", "attack", "attack, exponent protected", "random (mean ± std)"], rows),
    ]


def _backdoor_lines(row: Mapping[str, Any]) -> list[str]:
    return [
        f"**Backdoor by flips** (TBT, target class {row['target']}, {row['nb_flips']} flips of the quantized codes): "
        f"{row['attack_success_rate']:.3f} of the triggered test inputs of other classes go to the target (without "
        f"the flips {row['attack_success_rate_before']:.3f}), at clean accuracy {row['clean_accuracy']:.3f} (before "
        f"{row['clean_accuracy_before']:.3f}). The weight-integrity detector flags the groups of "
        f"{row['detected_flips']} of the {row['nb_flips']} flips; after its recovery the trigger sends "
        f"{row['recovered_attack_success_rate']:.3f} to the target, at clean accuracy "
        f"{row['recovered_clean_accuracy']:.3f}.",
    ]


def _integrity_lines(row: Mapping[str, Any]) -> list[str]:
    alarm = "a false alarm on the clean model" if row["false_alarm"] else "no false alarm on the clean model"
    return [
        f"**What the weight-integrity detector buys** (keyed checksums of each group's top bits, "
        f"{row['nb_groups']} groups; docs/bit_flips.md): of {row['nb_flips']} BFA flips it detects "
        f"{row['detected_flips']} ({alarm}); correcting the flagged groups from their signatures (zeroing those it "
        f"cannot explain) brings the accuracy from "
        f"{row['attacked_accuracy']:.3f} (attacked) back to {row['recovered_accuracy']:.3f} (quantized "
        f"{row['quantized_accuracy']:.3f}).",
    ]


def _clipping_lines(row: Mapping[str, Any]) -> list[str]:
    def pairs(encoding: Mapping[str, Any]) -> str:
        values = zip(row["nb_flips"], encoding["plain_mean"], encoding["clipped_mean"])
        return ", ".join(f"{k} flips {p:.3f} → {c:.3f}" for k, p, c in values)

    return [
        "**What activation clipping buys** (each ReLU clipped at the largest value it takes on the training data; "
        "mean accuracy under random bit flips, without → with clipping): float weights, any IEEE bit, "
        f"{pairs(row['float'])}; {row.get('n_bits', 8)}-bit codes, {pairs(row['quantized'])} (a flipped code stays "
        "inside the quantization range, so clipping has little to catch there).",
    ]


def certified_intro(flips: Mapping[str, Any]) -> str:
    """What the certified column covers (empty without a certificate; the reason when it was unavailable)."""
    if "certified_accuracy" not in flips:
        reason = flips.get("certified_unavailable")
        return f" No certificate against bit flips for this model: {reason}." if reason else ""
    n, method = flips["certified_points"], flips["certify_method"]
    return (
        f" Certified (BitFlipCertifier, method {method!r}, on the first {n} test points only: the certificate costs "
        "more than a forward pass): the share of points whose quantized prediction is correct and provably survives "
        "every set of at most k flipped bits, a lower bound of the accuracy under k flips where the attack gives an "
        "upper bound. It covers flips of the selected layers' weight codes (at most k distinct bits, sign bits "
        "included), not flips of biases, batch-norm parameters or activations (docs/bit_flips.md)."
    )


def flip_table(flips: Mapping[str, Any]) -> str:
    """Accuracy after k flips: BFA, random and (when computed) certified."""
    certified = flips.get("certified_accuracy")
    header = ["flips", "BFA", "random (mean ± std)"]
    if certified is not None:
        header.append(f"certified ({flips['certified_points']} points)")
    rows = []
    for i, k in enumerate(flips["flips"]):
        row = [
            str(k),
            f"{flips['bfa_accuracy'][i]:.3f}",
            f"{flips['random_mean'][i]:.3f} ± {flips['random_std'][i]:.3f}",
        ]
        rows.append(row + ([f"{certified[i]:.3f}"] if certified is not None else []))
    return markdown_table(header, rows)


def certified_flips_lines(flips: Mapping[str, Any]) -> list[str]:
    """The distribution of the certified flips: test points per largest number of flips certified (−1: misclassified
    by the quantized model), up to the largest one reached."""
    histogram = {int(k): int(v) for k, v in (flips.get("certified_flips_histogram") or {}).items()}
    if not histogram:
        return []
    most = max(histogram)
    reached = max([0] + [k for k, v in histogram.items() if v])
    labels = {-1: "misclassified", most: f"{most} (most tested)"}
    note = f"; none for more than {reached}" if reached < most else ""
    return [
        "",
        "Certified flips: test points by the largest number of flipped bits their prediction is certified against "
        f"(misclassified: wrong before any flip{note}):",
        "",
        markdown_table(
            ["certified flips"] + [labels.get(k, str(k)) for k in range(-1, reached + 1)],
            [["points"] + [str(histogram[k]) for k in range(-1, reached + 1)]],
        ),
    ]


def bit_flip_comparison(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Across models (e.g. the demo's standard and robust ones): how many flips BFA needs and the accuracy left."""
    flips = {name: e["bit_flips"] for name, e in models.items() if "bfa_accuracy" in (e.get("bit_flips") or {})}
    if len(flips) < 2:
        return []
    at_one = {
        name: f["certified_accuracy"][0]
        for name, f in flips.items()
        if "certified_accuracy" in f and f["flips"][0] == 1
    }
    certified = bool(at_one)
    points = "/".join(sorted({str(f["certified_points"]) for name, f in flips.items() if name in at_one}))
    rows = []
    for name, f in flips.items():
        most = max(f["flips"])
        halve = str(f["flips_to_halve"]) if f["flips_to_halve"] is not None else f"> {most}"
        rows.append([name, f"{f['quantized_accuracy']:.3f}", f"{f['bfa_accuracy'][-1]:.3f}",
                     f"{f['random_mean'][-1]:.3f}", halve])  # fmt: skip
        if certified:
            rows[-1].append(f"{at_one[name]:.3f}" if name in at_one else "–")
    most = max(max(f["flips"]) for f in flips.values())
    header = ["model", "quantized", f"BFA, {most} flips", f"random, {most} flips", "BFA flips to halve"]
    return [
        "",
        "## Bit flips across models",
        "",
        "Does weight-robust training change how many bit flips an attacker needs? Test accuracy of each quantized "
        f"model after {most} flips, and the flips BFA needs to halve it (more flips: more robust)"
        + (", and the share certified against any single flip:" if certified else ":"),
        "",
        markdown_table(header + ([f"certified, 1 flip ({points} points)"] if certified else []), rows),
    ]
