"""Qt-free state of the module's sections; the widget only binds to them."""
