"""Checkpoint -> browser: the student as a TF.js graph model (and ONNX), proven against PyTorch.

``python -m export.tfjs`` (tfjs.py: the conversion route and its report), ``python -m export.onnx``
(onnx.py: also the route's first step), ``python -m export.parity`` (parity.py: thresholds, TF.js in
Node, re-checking an export), ``python -m export.serve`` (serve.py: the demo page in ``web/``, or a
static bundle of it). bundle.py reads what every export carries from the checkpoint: labels,
preprocessing, temperature, and the real images parity is measured on.
"""
