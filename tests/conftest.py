"""Shared test configuration."""

import os
import sys

# tests import helper modules that live beside them (streams.py, qemu_support)
sys.path.insert(0, os.path.dirname(__file__))
