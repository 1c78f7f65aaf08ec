"""MMDF: test-time backdoor detection and fix in one ONNX graph (Wang, Miller & Kesidis).

A backdoor trigger drives a few neurons far outside anything clean inputs do; bounding the
ReLUs removes that, while a clean input's margin barely moves. So for the original model's
predicted class c^ = argmax g(x),

    d(x) = m_c^(x) - m_c^(x; Z),      m_c(x) = g_c(x) - max_{k != c} g_k(x),

the margin the bounds Z take away, is small on clean inputs and large on triggered ones. An
input is flagged when d exceeds a threshold calibrated on the clean set D (the *null*).

Bounds. The default ("clean-max") bounds every channel at the upper end of its range on D
(and D's 1-pixel shifts): the limit of MMAC's search at lambda = 0, the point it starts
from. MMAC's margin term pulls bounds into the clean range; that moves clean margins too
and blurs clean and triggered inputs (on the sample patch models MMAC bounds detect 82-95%
of triggered inputs, clean-max bounds 95-99.6%; the lower the accuracy floor, the worse).
Bounds fitted on D hold every D activation, so d on D is 0: the null is cross-fitted (each
image scored with bounds fitted on the other folds). MMAC or any other bounds can be given
instead; their null is d on D itself, optimistic when they were fitted on D (up to ~2x
alpha false positives on new clean inputs).

Null law. d on clean data is a point mass at 0 plus a short, skewed right tail: a fitted
Gaussian (the paper's choice) puts the threshold far too low (1.6-2.6% false positives at
alpha = 0.5% here, 5% on the prototype). The default is the conformal quantile over D's n
images (each scored by its largest shifted copy), the ceil((n + 1)(1 - alpha))-th smallest,
which a new clean image exceeds with probability <= alpha whatever the law; below 1 / alpha
images it is the largest, and the report says what that holds (`fit_image_null`).

The graph holds both branches. The bounded branch duplicates only the nodes that depend on
a bounded site and reads the very same weight initializers, so the file grows by a few
nodes, not by a second copy of the weights. It outputs

- the original logits name: the original logits where the input is not flagged; where it
  is, the bounded logits with c^ pushed to a large negative value (argmax = the best other
  class);
- `mmdf_detected` (bool [N]) and `mmdf_score` (float [N], d - threshold);
- with the feature test (`statistic="margin+features"`, the default), `mmdf_feature_score`:
  how far the input's site channel statistics (mean, spread, skew) lie from class c^ on D
  (from the focus class, see below), minus its threshold (`mmexport.features`). It catches
  triggers that stay inside the clean range, which d cannot see; an input is flagged by
  either test, alpha split between them.

Focus. A trigger that works makes the model predict its target. Where the MM-BD scan on D
(or the user) names the suspected target t, only inputs the original model sends to t can
be flagged, and both thresholds are set on D's images sent to t, ranked among all of D's
images (the others can never be flagged), so the false-positive rate over all clean inputs
stays alpha while the tests spend it where triggered inputs are. On the sample zoo this removed the false positives on
classes a trigger never produces (correctly classified "1"s of a signal-attack CNN, 2.0% ->
0.2%); the price: a wrongly named target leaves the triggered inputs untested. The graph
then stores the focus class's feature means only, and scores every input against them.

Gate. With a focus class the tests run inside an ONNX `If`, on the rows sent to it alone
(`gate`, the default; `mmdf.gate`): on clean traffic the graph then costs little more than the
original model (at real size 1.01-1.03x at batch 1, against 2.1-2.3x ungated). The logits and
flags are the ungated graph's; the scores of rows not tested are NaN.

Screen. Without a focus class every input can be flagged, yet d above its threshold needs
channels far past their clean range: the margin test judges only inputs whose exceedance
(`bounds.exceedance`) passes the 1 - `screen` quantile of D's cross-fitted exceedance (about a
fifth of clean inputs), and the gate runs the bounded branch on them and on what the feature
test flags (the clean ResNet-18: 2.2x -> 1.16-1.17x at batch 1; detection unchanged on the zoo and
the VGGs).

Bounds are written unfolded (`Min` / `Clip`, as `apply_bounds(form="min")`): folding them
would rescale weights the original branch shares.

Serve. Given a model harden wrote from this one (`serve`, `mmdf.serve`), the inputs MMDF does
not flag get that model's output instead of the original's: MMDF backs mmac-ft, which removes
the triggers it can name from the weights and leaves the others whole.
"""
