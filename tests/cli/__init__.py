"""Tests of the command line, one module per ``presso.cli`` module.

A package (unlike the other test folders) so that ``cli/test_train.py`` and ``train/test_train.py`` can share a name."""
