"""A small dense language-model project, written the way a Lightning user writes one."""
