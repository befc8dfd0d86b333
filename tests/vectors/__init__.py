"""Test vectors shared by the Python tests and the JavaScript client's tests."""
