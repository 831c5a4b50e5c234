data "aws_availability_zones" "available" {
  state = "available"
}

resource "aws_vpc" "cluster" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = {
    Name = var.cluster_name
  }
}

resource "aws_subnet" "nodes" {
  vpc_id                  = aws_vpc.cluster.id
  cidr_block              = var.subnet_cidr
  availability_zone       = coalesce(var.availability_zone, data.aws_availability_zones.available.names[0])
  map_public_ip_on_launch = true

  tags = {
    Name = "${var.cluster_name}-nodes"
  }
}

resource "aws_internet_gateway" "cluster" {
  vpc_id = aws_vpc.cluster.id

  tags = {
    Name = var.cluster_name
  }
}

# The table cloudroutes programs. It has no inline route blocks on purpose: with them terraform
# would own every route in the table and delete the pod routes cloudroutes adds on the next
# apply. Terraform's own routes are separate aws_route resources.
resource "aws_route_table" "nodes" {
  vpc_id = aws_vpc.cluster.id

  tags = {
    Name = "${var.cluster_name}-nodes"
  }
}

# The nodes install packages from the internet; this route is also one cloudroutes must leave
# alone (it is outside the pod network and not in its ledger).
resource "aws_route" "internet" {
  route_table_id         = aws_route_table.nodes.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.cluster.id
}

resource "aws_route_table_association" "nodes" {
  subnet_id      = aws_subnet.nodes.id
  route_table_id = aws_route_table.nodes.id
}

resource "aws_security_group" "nodes" {
  name        = "${var.cluster_name}-nodes"
  description = "cloudroutes test nodes: etcd, agents' health port and pod traffic"
  vpc_id      = aws_vpc.cluster.id

  tags = {
    Name = "${var.cluster_name}-nodes"
  }
}

resource "aws_vpc_security_group_ingress_rule" "etcd" {
  security_group_id = aws_security_group.nodes.id
  description       = "etcd clients (agents, controller, operators) inside the VPC"
  cidr_ipv4         = var.vpc_cidr
  ip_protocol       = "tcp"
  from_port         = 2379
  to_port           = 2379
}

resource "aws_vpc_security_group_ingress_rule" "healthz" {
  security_group_id = aws_security_group.nodes.id
  description       = "cloudroutes /healthz, /metrics and /status inside the VPC"
  cidr_ipv4         = var.vpc_cidr
  ip_protocol       = "tcp"
  from_port         = var.healthz_port
  to_port           = var.healthz_port
}

# Routed pod traffic keeps the pod's source address, so it is allowed by the pod network.
resource "aws_vpc_security_group_ingress_rule" "pods" {
  security_group_id = aws_security_group.nodes.id
  description       = "pod-to-pod traffic routed through the VPC route table"
  cidr_ipv4         = var.pod_network
  ip_protocol       = "-1"
}

resource "aws_vpc_security_group_ingress_rule" "nodes" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "node-to-node traffic"
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.ssh_cidr_blocks)

  security_group_id = aws_security_group.nodes.id
  description       = "SSH from ${each.value}"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
}

resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.nodes.id
  description       = "package downloads, EC2 API, and routed pod traffic"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}
