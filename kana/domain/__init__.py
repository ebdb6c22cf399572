"""Domain rules: identity, usage mapping and ledger, rules, features, flags, billing ids, keys."""
