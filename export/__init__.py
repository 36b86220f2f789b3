"""Serving and export code, installed as the package `zfkeras_export`."""
