"""Tests of scalelab.models (a package so its module names cannot clash with other test folders)."""
