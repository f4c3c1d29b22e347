"""TPROXY plumbing: the nftables table, the policy routing, who owns them, the guard
that keeps them, and the doctor that explains what would make TPROXY fail."""
