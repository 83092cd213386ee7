"""The offline checkpoint tools: inspect and verify (report.py), convert between meshes and formats
(convert.py), Hugging Face import and export (hf.py, with the safetensors files in safetensors.py).

They sit above everything they read: the checkpoint storage core (`checkpoint/`), the
model (`models/`), and, for `convert`, the training setup (`train.program`) that gives
the target layout. Nothing below imports this package; the command line loads each
tool only when its subcommand runs.
"""
