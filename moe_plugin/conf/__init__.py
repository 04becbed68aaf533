"""Hydra config groups shipped with the package (compose them with hydra.searchpath: [pkg://moe_plugin.conf])."""
