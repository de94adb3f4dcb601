"""lapdtr's recipes (YAML only), installed as ``lapdtr.configs`` so ``lapdtr demo`` finds its
embedded default in any install."""
