"""Built-in backends and their route tables.

Each backend registers here by name, as "module:attr" so that importing this package stays
cheap and a node never imports a cloud SDK it does not use.
"""

from cloudroutes.backend import register

register("host-gw", "providers.host_gw:HostGwBackend")
register("aws-vpc", "providers.aws_vpc:AwsVpcBackend")
register("ali-vpc", "providers.ali_vpc:AliVpcBackend")
register("gce", "providers.gce:GceBackend")
register("vxlan", "providers.vxlan:VxlanBackend")
register("udp", "providers.udp:UdpBackend")
