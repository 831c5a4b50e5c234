data "alicloud_zones" "available" {
  available_resource_creation = "VSwitch"
  available_instance_type     = var.instance_type
}

locals {
  zone_id = coalesce(var.zone_id, data.alicloud_zones.available.zones[0].id)
}

# The VPC's system route table (route_table_id) is the table cloudroutes programs. Terraform
# owns no entry in it: the entries cloudroutes adds are outside the state.
resource "alicloud_vpc" "cluster" {
  vpc_name    = var.cluster_name
  cidr_block  = var.vpc_cidr
  description = "cloudroutes test cluster ${var.cluster_name} (ali-vpc)"

  tags = {
    "cloudroutes-cluster" = var.cluster_name
  }
}

resource "alicloud_vswitch" "nodes" {
  vswitch_name = "${var.cluster_name}-nodes"
  vpc_id       = alicloud_vpc.cluster.id
  cidr_block   = var.vswitch_cidr
  zone_id      = local.zone_id

  tags = {
    "cloudroutes-cluster" = var.cluster_name
  }
}

# Outbound traffic is allowed by default in a basic security group; only ingress is listed.
resource "alicloud_security_group" "nodes" {
  security_group_name = "${var.cluster_name}-nodes"
  description         = "cloudroutes test nodes: etcd, agents' health port and pod traffic"
  vpc_id              = alicloud_vpc.cluster.id
  # Node-to-node traffic: the nodes share this group.
  inner_access_policy = "Accept"

  tags = {
    "cloudroutes-cluster" = var.cluster_name
  }
}

resource "alicloud_security_group_rule" "etcd" {
  security_group_id = alicloud_security_group.nodes.id
  description       = "etcd clients (agents, controller, operators) inside the VPC"
  type              = "ingress"
  policy            = "accept"
  nic_type          = "intranet"
  priority          = 1
  cidr_ip           = var.vpc_cidr
  ip_protocol       = "tcp"
  port_range        = "2379/2379"
}

resource "alicloud_security_group_rule" "healthz" {
  security_group_id = alicloud_security_group.nodes.id
  description       = "cloudroutes /healthz, /metrics and /status inside the VPC"
  type              = "ingress"
  policy            = "accept"
  nic_type          = "intranet"
  priority          = 1
  cidr_ip           = var.vpc_cidr
  ip_protocol       = "tcp"
  port_range        = "${var.healthz_port}/${var.healthz_port}"
}

# Routed pod traffic keeps the pod's source address, so it is allowed by the pod network.
resource "alicloud_security_group_rule" "pods" {
  security_group_id = alicloud_security_group.nodes.id
  description       = "pod-to-pod traffic routed through the VPC route table"
  type              = "ingress"
  policy            = "accept"
  nic_type          = "intranet"
  priority          = 1
  cidr_ip           = var.pod_network
  ip_protocol       = "all"
  port_range        = "-1/-1"
}

resource "alicloud_security_group_rule" "ssh" {
  for_each = toset(var.ssh_cidr_blocks)

  security_group_id = alicloud_security_group.nodes.id
  description       = "SSH from ${each.value}"
  type              = "ingress"
  policy            = "accept"
  nic_type          = "intranet"
  priority          = 1
  cidr_ip           = each.value
  ip_protocol       = "tcp"
  port_range        = "22/22"
}
