"""Weight stores: bytes in, bytes out, under one experiment prefix."""
