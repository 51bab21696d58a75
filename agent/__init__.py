"""The device agent: usage log -> samples -> int8 front layers -> LDP noise -> signed uplink."""
