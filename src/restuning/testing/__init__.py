"""What the tests and benchmarks check the library against; never imported by the library itself.

`reference`: the bound forms of the methods Res-Tuning unbinds (prefix tuning, VPT-deep, the serial
adapter), written as their papers define them, for the exact-equivalence tests.
"""
