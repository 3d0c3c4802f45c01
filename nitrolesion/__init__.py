"""Confidential skin-lesion classification on AWS Nitro Enclaves: the shared package."""

#: The tool's version, recorded in results files; pyproject.toml reads it from here.
__version__ = "2.0"
