output "route_table_id" {
  description = "The VPC's route table cloudroutes programs (RouteTableIDs in the network config)."
  value       = alicloud_vpc.cluster.route_table_id
}

output "instance_ids" {
  description = "Instance ids of the nodes, in order; the first runs etcd."
  value       = alicloud_instance.node[*].id
}

output "private_ips" {
  description = "Private IPv4 addresses of the nodes, in order."
  value       = alicloud_instance.node[*].private_ip
}

output "etcd_endpoint" {
  description = "The cluster's etcd, for --etcd-endpoints from inside the VPC."
  value       = local.etcd_endpoint
}

output "network_config" {
  description = "The network config the first node writes to etcd once."
  value       = local.network_config
}

output "vpc_id" {
  value = alicloud_vpc.cluster.id
}

output "vswitch_id" {
  value = alicloud_vswitch.nodes.id
}

output "node_ram_role" {
  description = "RAM role holding the ali-vpc node policy."
  value       = alicloud_ram_role.node.role_name
}

output "controller_ram_role" {
  description = "RAM role holding the ali-vpc controller policy, or null when controller_role is false."
  value       = one(alicloud_ram_role.controller[*].role_name)
}
