"""The toy models' files (weights/README.md), installed as the package `minigen.weights` (setup.py
maps this folder there) so that `minigen.loading.toy` finds them through importlib.resources in a
regular install as in an editable one."""
