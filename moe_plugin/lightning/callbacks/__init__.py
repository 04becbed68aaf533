"""Lightning callbacks shipped with the plugin."""
