"""The security lab: adversarial attacks and their honest evaluation, data poisoning (backdoors)
and its detection, and a model-file scanner that reads pickles without running them."""
