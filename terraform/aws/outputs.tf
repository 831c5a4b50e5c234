output "route_table_id" {
  description = "The route table cloudroutes programs (RouteTableID in the network config)."
  value       = aws_route_table.nodes.id
}

output "instance_ids" {
  description = "Instance ids of the nodes, in order; the first runs etcd."
  value       = aws_instance.node[*].id
}

output "private_ips" {
  description = "Private IPv4 addresses of the nodes, in order."
  value       = aws_instance.node[*].private_ip
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
  value = aws_vpc.cluster.id
}

output "subnet_id" {
  value = aws_subnet.nodes.id
}

output "node_instance_profile" {
  description = "Instance profile holding the aws-vpc node policy."
  value       = aws_iam_instance_profile.node.name
}

output "controller_instance_profile" {
  description = "Instance profile holding the aws-vpc controller policy, or null when controller_role is false."
  value       = one(aws_iam_instance_profile.controller[*].name)
}
