"""What commands and web tabs share, below the methods: the input checks, the common flags, the web app's pieces."""
