"""Thin KFP v2 components, one module per stage; the logic lives in the kubetrain library."""
