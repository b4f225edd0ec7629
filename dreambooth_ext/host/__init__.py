"""Host adapters: everything that differs between the WebUI (A1111, Forge, SD.Next) and the standalone page."""
