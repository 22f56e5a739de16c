"""Tests of scalelab.losses (a package so that spawned ranks can import the worker by module name)."""
