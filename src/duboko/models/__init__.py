"""Model families. Importing this package registers every named variant in `duboko.registry`."""

from duboko.models import cnn, mlp, rnn, scorer, transformer, unet  # noqa: F401
