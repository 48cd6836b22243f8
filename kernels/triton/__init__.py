"""Triton kernels of Superlinear attention (being built). `available()` says whether they can run here."""


def available() -> bool:
    return False
