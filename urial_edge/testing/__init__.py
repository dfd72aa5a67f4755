"""Support for the tests and the benchmarks (tiny random models, a server in a subprocess).

The runtime never imports this package.
"""
