"""Calibration and evaluation data: definitions and generators.

Installed as ``edgepeft.calib`` (see ``[tool.setuptools.package-dir]`` in pyproject.toml), so recipes can name
these sets as ``builtin:NAME`` without a path into the source tree.
"""
