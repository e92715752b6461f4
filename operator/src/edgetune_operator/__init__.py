"""edgetune."""
