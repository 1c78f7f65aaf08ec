"""Human-readable tables for the CLI (rich); JSON output lives in the callers."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

_out = Console(highlight=False)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def print_inspect(info: dict) -> None:
    _out.print(f"[bold]{info['path'] or 'model'}[/]  opset {info['opset']}  IR {info['ir_version']}  "
               f"nodes {info['nodes']}  classes {info['num_classes']}")
    for kind in ("inputs", "outputs"):
        for io in info[kind]:
            mark = " (chosen)" if io["name"] in (info["input"], info["output"]) else ""
            _out.print(f"  {kind[:-1]:6} {io['name']}  {io['shape']}{mark}")
    lay = info.get("layout")
    if lay and lay["channel_axis"] is not None:
        _out.print(f"  layout {lay['name']} (channels on axis {lay['channel_axis']}: {lay['reason']})")
    if info.get("fixed_batch"):
        _out.print(f"  batch  fixed at {info['fixed_batch']} (onnxruntime runs batches of {info['fixed_batch']}, "
                   "the last one padded)")
    logits = info.get("logits")
    if logits and logits["via"]:
        _out.print(f"  logits  {logits['tensor']} ({info['output']} is its {logits['via']}): margins, "
                   "bounds and MMDF use the logits")
    if info["unsupported_ops"]:
        ops = ", ".join(f"{u['op']} (node {u['node']!r})" for u in info["unsupported_ops"])
        _out.print(f"[red]unsupported ops:[/] {ops}")
    if info["sites"]:
        kinds = {}
        for s in info["sites"]:
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
        t = Table(title=f"{len(info['sites'])} clipping sites ("
                  + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")", title_justify="left")
        for col in ("site", "kind", "op", "channels"):
            t.add_column(col)
        for s in info["sites"]:
            last = " (last axis)" if s["axis"] != 1 else ""
            t.add_row(s["name"], s["kind"], s["op"], f"{s['channels']}{last}")
        _out.print(t)
    else:
        _out.print(f"[yellow]{info['no_sites']}[/]: harden and detect have nothing to bound")
    v = info.get("verify")
    if v:
        for o in v["outputs"]:
            if "error" in o:
                _out.print(f"  verify {o['name']}: [red]{o['error']}[/]")
            else:
                what = f" (logits of {o['logits_of']})" if o.get("logits_of") else ""
                _out.print(f"  verify {o['name']}{what}: max abs diff {o['max_abs_diff']:.3g}, "
                           f"max rel diff {o['max_rel_diff']:.3g}")
        batching = {"scaled": "batched (shapes holding the fixed batch follow the batch, checked against "
                              "single batches)",
                    "vmapped": f"vectorised over groups of {v.get('fixed_batch')} (torch.func.vmap: the graph "
                               "folds its fixed batch into other axes)",
                    "chunks": f"in batches of {v.get('fixed_batch')} (the graph bakes its batch in)"}
        if v.get("engine_batching") in batching:
            _out.print(f"  engine ran the {v['samples']} inputs {batching[v['engine_batching']]}")
        verdict = "[green]PASSED[/]" if v["passed"] else "[red]FAILED[/]"
        _out.print(f"{verdict} engine vs onnxruntime ({v['provider']}, {v['samples']} inputs in "
                   f"{v['input_range']}, atol {v['atol']:g}, rtol {v['rtol']:g})")


def print_harden(summary: dict) -> None:
    mb, ma = summary["max_margins_before"], summary["max_margins_after"]
    _out.print("per-class max margin (fresh, equal-seeded search)")
    t = Table()
    t.add_column("class")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for c, (b, a) in enumerate(zip(mb, ma, strict=True)):
        t.add_row(str(c), f"{b:.2f}", f"{a:.2f}")
    _out.print(t)
    stamp = summary.get("stamp")
    if stamp is not None and stamp.get("scan") is not None:  # no stamp stood out: the scan was asked
        from .progress import stamp_text

        _out.print(stamp_text(stamp))
    elif stamp is not None:
        t_ = stamp["target"]
        found = "unlearned through the bounds" if stamp["found"] else "below the gate, max-margin search"
        _out.print(f"stamp search: class {t_} stands out by {stamp['outlier']:.1f} (gate "
                   f"{summary['settings']['unlearn_gate']:g}), its stamp sends {_pct(stamp['fooled'][t_])} of "
                   f"D's other classes to it: {found}")
    sched = summary.get("schedule")
    if sched and sched.get("changed"):
        from .progress import schedule_text

        _out.print(schedule_text(sched))
    _out.print(f"{summary['method'].upper()}: {summary['sites']} sites bounded, lambda {summary['lambda']:.3g}, "
               f"clean-set accuracy kept {_pct(summary['clean_set_accuracy'])}, {summary['epochs']} epochs, "
               f"{summary['seconds']:.1f} s on {summary['device']}")
    refit = summary.get("refit")
    if refit:
        kept = refit[-1]
        top = max(refit[:-1], key=lambda r: (r["balanced_accuracy"], r["penalty"]))
        if top["balanced_accuracy"] > kept["balanced_accuracy"]:
            _out.print(f"last layer re-fitted on D: penalty {top['penalty']:g}, held-out balanced accuracy "
                       f"{_pct(kept['balanced_accuracy'])} -> {_pct(top['balanced_accuracy'])}")
        else:
            _out.print(f"last layer kept: no re-fit beat it on held-out D ({_pct(kept['balanced_accuracy'])})")
    ft = summary.get("finetune")
    if ft:
        (a0, a1), (f0, f1) = ft["accuracy_D"], ft["stamped_to_target"]
        copies = " and ".join({"stamp": "stamped", "shift": "shifted"}[s] for s in stamp.get("stand_ins", ["stamp"]))
        _out.print(f"weights fine-tuned ({ft['epochs']} epochs, lr {ft['lr']:g}, {ft['rows']} rows of D and its "
                   f"{copies} copies): those copies sent to class {stamp['target']} {_pct(f0)} -> {_pct(f1)}, "
                   f"accuracy on D {_pct(a0)} -> {_pct(a1)}")
    elif summary["method"] == "mmac-ft":
        _out.print("weights not fine-tuned: no stamp stood out (mmac-ft is MMAC here); a trigger nobody named can "
                   "still be caught at test time: mmexport detect MODEL --data D --serve this model")
    forms = summary.get("site_forms") or {}
    for site in forms.get("sites", []):
        why = f" ({site['reason']})" if site.get("reason") else ""
        _out.print(f"  {site['site']}: {site['form']}{why}")
    for kind, path in summary["written"].items():
        _out.print(f"wrote {kind}: {path}")


def print_plan(plan: dict) -> None:
    from .progress import duration, schedule_text

    _out.print(schedule_text(plan))
    how = "counted at reference rates" if plan.get("costs") == "reference" else "measured"
    _out.print(f"{how}, per row: {plan['backward_ms_per_row']:.3g} ms forward+backward, "
               f"{plan['forward_ms_per_row']:.3g} ms forward, {plan['saved_mib_per_row']:.3g} MiB saved for the "
               f"backward; {plan['chunk_rows']} rows per chunk")
    if plan.get("measured_seconds") is None:
        _out.print(f"predicted search time: {duration(plan['planned_seconds'])} (an upper bound: the search may stop "
                   "early; loading and writing the model come on top)")
    else:
        _out.print(f"predicted search time: {duration(plan['planned_seconds'])} at reference rates (the budget the "
                   f"schedule was fitted to); here, at costs timed now: about {duration(plan['measured_seconds'])} "
                   "(the search may stop early; loading, writing the model and any scan come on top)")
    if plan.get("finetune_seconds") is not None:
        _out.print(f"then, where a stamp is found, the weights' fine-tune: about {duration(plan['finetune_seconds'])} "
                   "(mmac-ft; outside the time limit; about half again where the scan's shift joins the stamp)")


def print_validation(rep, *, title: str = "") -> None:
    _out.print(f"[bold]{title}[/]  ({rep.provider} provider, {rep.images_per_s:.0f} images/s)")
    t = Table()
    t.add_column("class")
    t.add_column("accuracy", justify="right")
    for c, a in enumerate(rep.per_class_accuracy):
        t.add_row(str(c), _pct(a))
    _out.print(t)
    _out.print(f"accuracy {_pct(rep.accuracy)}  balanced {_pct(rep.balanced_accuracy)}  (n={rep.n})")
    if rep.asr is not None:
        _out.print(f"ASR {_pct(rep.asr)}  RA {_pct(rep.ra)}  (n_attack={rep.n_attack})")
    if getattr(rep, "false_positive_rate", None) is not None:  # an MMDF model
        det = "" if rep.detection_rate is None else f"detection {_pct(rep.detection_rate)}  "
        _out.print(f"MMDF: {det}false positives {_pct(rep.false_positive_rate)} (clean inputs flagged)")
        held = getattr(rep, "false_positive_guarantee", None)
        if held is not None:
            p = rep.false_positive_p_value
            flagged = round(rep.false_positive_rate * rep.n)
            verdict = ("[yellow]more than they hold: is this clean data like the set it was calibrated on?[/]"
                       if p < 0.05 else "within what they hold")
            _out.print(f"the thresholds hold <= {_pct(held)} on new clean images; {flagged} of {rep.n} flagged "
                       f"(p = {p:.2g} at that rate): {verdict}")


_VERDICT_STYLE = {"better": "green", "same": "", "worse": "red", "n/a": "dim"}


def print_detect(summary: dict) -> None:
    null, cal, gap = summary["null"], summary["calibration"], summary["margin_gap_clean_set"]
    params = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in null["params"].items())
    how = f"{cal['cross_fit_folds']}-fold cross-fitted" if cal["cross_fit_folds"] else "on the bounds given"
    _out.print(f"MMDF: {summary['sites']} bounded sites from {summary['bounds_source']}")
    _out.print(f"d on D ({cal['n']} inputs{' with 1-pixel shifts' if cal['augment'] else ''}, {how}): "
               f"{_pct(gap['zero_fraction'])} zero, median {gap['quantiles']['0.5']:.3g}, "
               f"99% {gap['quantiles']['0.99']:.3g}, max {gap['max']:.3g}")
    feats = summary.get("features")
    focus = summary.get("focus") or {}
    alpha = null["alpha"]  # each test's level: alpha, split between the tests (over the focus share)
    by_image = null["params"].get("unit") == "image"
    if focus.get("class") is not None:
        level = "" if by_image else f"; alpha {alpha:.3g} each keeps {summary['alpha']:g} over all inputs"
        _out.print(f"focus: only inputs predicted as class {focus['class']} are tested "
                   f"({focus['n']} of D's inputs, {_pct(focus['share'])}{level})")
        if summary.get("gated"):
            _out.print("gate: the graph runs the tests on those inputs alone (others: original logits, "
                       "NaN scores; --no-gate scores every input)")
    screen = summary.get("screen") or {}
    if "threshold" in screen:
        kept = screen.get("margin_flags_kept")
        kept = ("" if kept is None else
                f"; {_pct(kept)} of the {screen['margin_flags']} over the margin threshold pass it")
        _out.print(f"screen: the margin test judges inputs whose activations pass their clean range by more "
                   f"than {screen['threshold']:.3g} ({_pct(screen['share'])} of D, cross-fitted{kept})")
        if summary.get("gated"):
            _out.print("gate: the bounded branch runs on those and on what the feature test flags "
                       "(others: original logits, NaN margin scores; --screen 1 tests every input)")
    _out.print(f"null law {null['law']} ({params}): threshold {summary['threshold']:.4g} at alpha {alpha:g}")
    if feats:
        folds = cal.get("feature_folds") or cal["cross_fit_folds"]
        _out.print(f"feature test: {len(feats['sites'])} sites (channel mean, spread and skew; "
                   f"class-conditional Gaussian, {folds}-fold cross-fitted on D): "
                   f"threshold {feats['threshold']:.4g} at alpha {alpha:g}")
    if by_image:
        tests = 2 if feats else 1
        held = summary.get("false_positive_guarantee", tests * null["params"]["guarantee"])
        short = ""
        if held > summary["alpha"] * (1 + 1e-9):
            short = (f", not the {summary['alpha']:g} asked (D has {null['n']} images; that takes "
                     f"{math.ceil(tests / summary['alpha']) - 1})")
        _out.print(f"false positives: {'either test' if feats else 'the test'} flags a new clean image "
                   f"with probability <= {held:.3g}{short}")
    _out.print(f"flags {_pct(summary['false_positive_rate_clean_set'])} of D")
    avoid = summary.get("avoid") or {}
    scan = avoid.get("scan")
    if scan is not None and "skipped" in scan:
        _out.print(f"scan skipped, no class avoided: {scan['skipped']}")
    elif scan is not None:
        found = (f"suspected target class {scan['target_class']}" if scan["verdict"] == "backdoor"
                 else "no backdoor target")
        _out.print(f"scan: {found} (p = {scan['p_value']:.3g}); "
                   + ("flagged inputs never go to it" if avoid["class"] is not None else "no class avoided"))
    elif avoid.get("class") is not None:
        _out.print(f"flagged inputs never go to class {avoid['class']} (given)")
    served = summary.get("served")
    if served:
        _out.print(f"serves: inputs not flagged get the output of {served['file']} "
                   f"({served.get('method') or 'hardened'}) instead of the original's")
    for kind, path in summary["written"].items():
        _out.print(f"wrote {kind}: {path}")


def print_compare(rep) -> None:
    """PRE vs POST: a summary table, a per-class table, then one verdict line per metric."""
    from ..comparison.report import per_class_rows, summary_rows

    rows = summary_rows(rep)
    t = Table(title=f"{rep.pre.path or 'PRE'} vs {rep.post.path or 'POST'}  ({rep.provider} provider, "
                    f"n={rep.n})", title_justify="left")
    for col in ("metric", "PRE", "POST"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for _, label, x, y, _v in rows:
        t.add_row(label, x, y)
    _out.print(t)
    c = Table(title="per class", title_justify="left")
    for col in ("class", "accuracy PRE", "accuracy POST", "max margin PRE", "max margin POST"):
        c.add_column(col, justify="right")
    for row in per_class_rows(rep):
        c.add_row(*row)
    _out.print(c)
    ops = ", ".join(f"{op} {d:+d}" for op, d in rep.node_type_diff.items()) or "none"
    _out.print(f"prediction agreement {_pct(rep.agreement)}, max abs logit difference "
               f"{rep.max_abs_logit_diff:.4g}; node types POST - PRE: {ops}")
    if rep.margins_note:
        _out.print(f"[yellow]{rep.margins_note}[/]")
    if rep.latency_note:
        _out.print(f"[yellow]{rep.latency_note}[/]")
    width = max(len(key) for key, *_ in rows)
    for key, _label, x, y, v in rows:
        if v:
            style = _VERDICT_STYLE.get(v, "")
            shown = f"[{style}]{v:<6}[/]" if style else f"{v:<6}"
            _out.print(f"{key:<{width}}  {shown}  {x} -> {y}")


def print_scan(result: dict) -> None:
    """Per-class statistics, each test's candidate and p-value, then the verdict line."""
    tests = result["tests"]
    t = Table(title=f"{result['model'] or 'model'}: MM-BD scan ({result['device']}, {result['seconds']:.1f} s)",
              title_justify="left")
    t.add_column("class", justify="right")
    for name in tests:
        t.add_column(name.replace("_", " ").replace(" l2", " (L2)"), justify="right")
    for c in range(len(tests["max_margin"]["values"])):
        t.add_row(str(c), *(f"{test['values'][c]:.2f}" + (" *" if c == test["candidate"] else "")
                            for test in tests.values()))
    _out.print(t)
    for name, test in tests.items():
        plugin = test.get("plugin_p")
        cal = (f"; plug-in p {plugin:.3g}, calibrated by {result['settings'].get('calibration_draws')} draws"
               if plugin is not None and plugin != test["p_value"] else "")
        _out.print(f"{name}: largest at class {test['candidate']}, p = {test['p_value']:.3g} "
                   f"(gamma null on the other classes: shape {test['null_shape']:.3g}, scale {test['null_scale']:.3g}"
                   f"{cal})")
    if result["verdict"] == "backdoor":
        _out.print(f"[red]BACKDOOR[/] target class {result['target_class']} (p = {result['p_value']:.3g} < "
                   f"alpha {result['alpha']:g}, {result['statistic']})")
    else:
        _out.print(f"[green]CLEAN[/] no class stands out (p = {result['p_value']:.3g} >= alpha {result['alpha']:g})")
