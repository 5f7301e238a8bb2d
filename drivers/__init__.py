"""Wire protocols of bessgw: Modbus TCP/RTU, CAN BMS decoders and the PCS command path.

Nothing in this package makes control decisions. Every value it produces is a
:class:`drivers.quality.Reading` with a timestamp and a quality flag.
"""
