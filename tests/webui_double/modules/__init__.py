"""Stand-in for the WebUI's `modules` package (A1111 v1.10.1); see ../README.md."""
