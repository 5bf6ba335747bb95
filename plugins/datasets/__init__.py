"""Built-in data-set sources (one module, registered through the entry-point group like any plugin)."""
