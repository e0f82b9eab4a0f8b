"""Placeholder: this family registers its models here."""
