"""Model families, one module each. `duboko.registry` imports every module of this package on its
first look-up, and importing a module registers its named variants: a new family is one new file."""
