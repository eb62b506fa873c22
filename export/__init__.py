"""Checkpoint -> browser: the student as a TF.js graph model (and ONNX), proven against PyTorch.

``flora export tfjs`` (tfjs.py: the conversion route and its report), ``flora export onnx``
(onnx.py: also the route's first step), ``flora parity`` (parity.py: thresholds, TF.js in
Node, re-checking an export), ``flora serve`` (serve.py: the demo page in ``web/``, or a
static bundle of it). bundle.py reads what every export carries from the checkpoint: labels,
preprocessing, temperature, and the real images parity is measured on.
"""
